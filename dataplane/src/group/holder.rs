//! Who serves a slot: a process named by its pid and start time, so a record outlives pid
//! reuse.
use std::io;

/// Who serves a slot's socket, as recorded in the slot's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The serving process.
    pub pid: u32,
    /// The generation it belongs to.
    pub generation: u32,
    /// Its start time ([`start_time`]), so the record names this process
    /// even after its pid is reused.
    pub started: u64,
    /// How many times the slot's worker was restarted before this one.
    pub restarts: u32,
}

impl Holder {
    /// This process, generation 0: for sockets the caller serves itself.
    pub fn this_process() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            generation: 0,
            started: start_time(pid).unwrap_or(0),
            restarts: 0,
        }
    }
}

/// The start time of `pid` in clock ticks after boot (`/proc/<pid>/stat` field 22): with
/// the pid, it names one process for the life of the machine.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time"),
        )
    })
}

/// Field 22 of a `/proc/<pid>/stat` line; the command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id()).unwrap() > 0);
    }
}
