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

/// The smallest `RLIMIT_MEMLOCK` glommio 0.9 accepts: below it every shard
/// executor fails to build its reactor.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Makes sure `RLIMIT_MEMLOCK` lets glommio start: a soft limit below
/// [`MIN_MEMLOCK`] is raised to the hard limit; if that is not enough, the
/// error says what to change.
pub fn ensure_memlock() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if lim.rlim_cur >= MIN_MEMLOCK {
        return Ok(());
    }
    if lim.rlim_max >= MIN_MEMLOCK {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising the soft limit
        // up to the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            log::info!(
                "RLIMIT_MEMLOCK raised from {} KiB to the hard limit",
                lim.rlim_cur / 1024
            );
            return Ok(());
        }
    }
    Err(format!(
        "RLIMIT_MEMLOCK is {} KiB (hard limit {} KiB); the io_uring engine needs at least {} KiB: \
         raise it (`ulimit -l`, systemd `LimitMEMLOCK=`, docker `--ulimit memlock=-1`; see tuning.md)",
        lim.rlim_cur / 1024,
        lim.rlim_max / 1024,
        MIN_MEMLOCK / 1024
    ))
}

/// Resolves `engine` to the engine that will run the shards.
pub fn choose(engine: &str) -> Result<&'static str, EngineError> {
    match engine {
        "glommio" | "auto" => {
            probe_io_uring().map_err(|why| {
                EngineError(format!(
                    "engine = \"{engine}\": io_uring is unavailable here ({why}); \
                     under Docker or containerd allow the io_uring syscalls in the seccomp profile \
                     (see tuning.md). The portable may engine is not available in this build yet."
                ))
            })?;
            ensure_memlock().map_err(|why| EngineError(format!("engine = \"{engine}\": {why}")))?;
            Ok("glommio")
        }
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
