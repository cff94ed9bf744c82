//! Engine selection: `glommio` (io_uring) runs the shards; `auto` probes
//! io_uring first and says clearly why it cannot run, instead of letting
//! glommio panic (container seccomp profiles commonly drop the io_uring
//! syscalls). The portable `may` engine is not built yet: asking for it, or
//! falling back to it, is a start-up error naming the cause.

use std::fmt;

#[derive(Debug)]
pub struct EngineError(String);

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EngineError {}

/// Whether this process may create an io_uring instance (and why not).
pub fn probe_io_uring() -> Result<(), String> {
    // io_uring_params is 120 bytes; zeroed means "defaults".
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes the params struct we own; the
    // returned descriptor is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: fd is a descriptor we just received and own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Resolves `engine` to the engine that will run the shards.
pub fn choose(engine: &str) -> Result<&'static str, EngineError> {
    match engine {
        "glommio" | "auto" => match probe_io_uring() {
            Ok(()) => Ok("glommio"),
            Err(why) => Err(EngineError(format!(
                "engine = \"{engine}\": io_uring is unavailable here ({why}); \
                 under Docker or containerd allow the io_uring syscalls in the seccomp profile \
                 (see tuning.md). The portable may engine is not available in this build yet."
            ))),
        },
        "may" => Err(EngineError(
            "engine = \"may\": the portable engine is not available in this build yet; use \"glommio\" or \"auto\"".into(),
        )),
        other => Err(EngineError(format!("unknown engine {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn io_uring_is_available_on_this_kind_of_machine() {
        // The CI machines run kernel 6.x with io_uring allowed.
        assert_eq!(super::probe_io_uring(), Ok(()));
        assert_eq!(
            super::choose("auto").map_err(|e| e.to_string()),
            Ok("glommio")
        );
        assert!(super::choose("may").is_err());
    }
}
