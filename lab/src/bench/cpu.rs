//! CPU time of processes from `/proc/<pid>/stat` (utime + stime, in clock ticks), without unsafe
//! code: the tick rate comes from `getconf CLK_TCK` (100 if that cannot be run). A PostgreSQL
//! server is counted as its postmaster plus its live children plus the children it already reaped
//! (cutime + cstime of the postmaster).

use std::path::Path;
use std::sync::OnceLock;

/// Clock ticks per second for `/proc` times.
pub fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and parentheses,
/// so we split after the last `)`). Field 3 (state) is index 0.
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// `(ppid, utime + stime, cutime + cstime)` from the text of a stat file.
pub fn parse_stat(text: &str) -> Option<(u32, u64, u64)> {
    let fields = stat_fields(text)?;
    // Fields 4 (ppid), 14-17 (utime, stime, cutime, cstime), numbered from 1.
    let at = |n: usize| fields.get(n - 3).copied();
    let ppid = at(4)?.parse().ok()?;
    let own = at(14)?.parse::<u64>().ok()? + at(15)?.parse::<u64>().ok()?;
    let children = at(16)?.parse::<i64>().ok()?.max(0) as u64 + at(17)?.parse::<i64>().ok()?.max(0) as u64;
    Some((ppid, own, children))
}

fn read_stat(pid: u32) -> Option<(u32, u64, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU ticks used so far by one process (all its threads); 0 if it is gone.
pub fn process_ticks(pid: u32) -> u64 {
    read_stat(pid).map_or(0, |(_, own, _)| own)
}

/// CPU ticks of this process.
pub fn self_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text))
        .map_or(0, |(_, own, _)| own)
}

/// CPU ticks of a process and its direct children, live and reaped (a PostgreSQL server: the
/// postmaster forks every backend and helper directly).
pub fn tree_ticks(root: u32) -> u64 {
    let Some((_, own, reaped)) = read_stat(root) else {
        return 0;
    };
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .filter(|(ppid, _, _)| *ppid == root)
        .map(|(_, own, _)| own)
        .sum();
    own + reaped + children
}

/// The postmaster's pid: the first line of `<data dir>/postmaster.pid`.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> f64 {
    ticks as f64 * 1_000_000.0 / ticks_per_second() as f64
}

/// Which processes to watch.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    pub coordinator: Option<u32>,
    pub participants: Vec<u32>,
    pub postmasters: Vec<u32>,
}

/// CPU ticks of each group at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub coordinator: u64,
    pub participants: u64,
    pub postgres: u64,
    pub bench: u64,
}

impl Watched {
    pub fn sample(&self) -> CpuSample {
        CpuSample {
            coordinator: self.coordinator.map_or(0, process_ticks),
            participants: self.participants.iter().copied().map(process_ticks).sum(),
            postgres: self.postmasters.iter().copied().map(tree_ticks).sum(),
            bench: self_ticks(),
        }
    }
}

impl CpuSample {
    /// `self - earlier`, per group (saturating: a restarted process starts from zero).
    pub fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            coordinator: self.coordinator.saturating_sub(earlier.coordinator),
            participants: self.participants.saturating_sub(earlier.participants),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            bench: self.bench.saturating_sub(earlier.bench),
        }
    }

    pub fn add(&mut self, other: &CpuSample) {
        self.coordinator += other.coordinator;
        self.participants += other.participants;
        self.postgres += other.postgres;
        self.bench += other.bench;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "1234 (treaty coord) S 77 1234 1234 0 -1 4194560 100 0 0 0 250 50 3 4 20 0 8 0 \
                    100 1000 10 18446744073709551615";
        assert_eq!(parse_stat(line), Some((77, 300, 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_our_own_process() {
        assert!(ticks_per_second() > 0);
        let pid = std::process::id();
        assert!(read_stat(pid).is_some());
    }
}
