//! The reference server for benchmarks: a do-nothing `may_minihttp` server
//! (TechEmpower's fastest Rust entry) answering every request with the same
//! small JSON body that `GET /health` returns (a request body is read and
//! discarded). Run it on the same cores as
//! Triggers in the same run, so throughput can be reported as a ratio.
//!
//! Usage: `refserver [ADDR] [WORKERS]` (default 127.0.0.1:8090, 1 worker).

use may_minihttp::{HttpServer, HttpService, Request, Response};
use std::io;

#[derive(Clone)]
struct Healthy;

impl HttpService for Healthy {
    fn call(&mut self, req: Request, rsp: &mut Response) -> io::Result<()> {
        // Consume any body (POST benchmarks), as a real handler would.
        io::copy(&mut req.body(), &mut io::sink())?;
        rsp.header("Content-Type: application/json");
        rsp.body(r#"{"status":"healthy"}"#);
        Ok(())
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    may::config().set_workers(workers);
    let server = match HttpServer(Healthy).start(&addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("refserver: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("refserver listening on http://{addr} with {workers} worker(s)");
    server.wait();
}
