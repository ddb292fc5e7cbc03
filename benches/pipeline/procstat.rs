//! CPU time of processes from `/proc`, and finding the local broker by the port it listens on.
//!
//! CPU is `utime + stime` (fields 14 and 15 of `/proc/<pid>/stat`, every thread of the process, in clock ticks of
//! `getconf CLK_TCK`, normally 100 per second). The broker is the process holding the LISTEN socket of the AMQP
//! URL's port: its inode from `/proc/net/tcp` and `/proc/net/tcp6` (state `0A`), then the process whose
//! `/proc/<pid>/fd/*` links to `socket:[<inode>]`. A remote broker (or one not found) has no figure: `None`.
//!
//! [`self_check`] runs the whole chain against this process before anything is measured: a listener of its own
//! must be found as this process, and a `stat` line whose command name holds spaces and parentheses must parse.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{Context, bail, ensure};

/// Clock ticks per second (`getconf CLK_TCK`, asked once; 100 if `getconf` cannot answer).
pub fn ticks_per_second() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|hz: &u64| *hz > 0)
            .unwrap_or(100)
    })
}

/// `utime + stime` from the text of a `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from the last `)`.
fn ticks_of_stat(text: &str) -> anyhow::Result<u64> {
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .context("no ')' in a stat line")?;
    // After the name: field 3 (state) is index 0, so field 14 (utime) is index 11 and 15 (stime) index 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    ensure!(fields.len() > 12, "a stat line with too few fields");
    let utime: u64 = fields[11].parse().context("utime")?;
    let stime: u64 = fields[12].parse().context("stime")?;
    Ok(utime + stime)
}

/// CPU ticks (user + system) spent so far by process `pid`.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    ticks_of_stat(&text).with_context(|| format!("parsing {path}"))
}

/// Inodes of the LISTEN sockets on `port` in the text of a `/proc/net/tcp` or `/proc/net/tcp6`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (*state == "0A" && local_port == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// The process holding a LISTEN socket on `port` (any local address), if this machine has one and `/proc` shows it.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|s| target.as_os_str() == s.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Host and port of an `amqp://` or `amqps://` URL (default ports 5672 and 5671).
/// Not lapin's `AMQPUri`: it keeps only a domain name as the host and puts `localhost` for an IP address, so a
/// broker at 10.0.0.5 would look local.
fn amqp_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        _ => return None,
    };
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() => p.parse().ok()?,
        _ => default,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The local broker's process for `amqp_url`: `None` for a remote host or when no process is found.
pub fn broker_pid(amqp_url: &str) -> Option<u32> {
    let (host, port) = amqp_host_port(amqp_url)?;
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1") {
        return None;
    }
    listener_pid(port)
}

/// Checks the parsing and the socket search against this process; an error means the method is broken here.
pub fn self_check() -> anyhow::Result<()> {
    let line =
        "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 1 0 12 0 0";
    ensure!(
        ticks_of_stat(line)? == 42,
        "a stat line with spaces and parentheses in the name did not parse to 37 + 5 ticks"
    );
    let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                 0: 0100007F:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 31337 1\n   \
                 1: 0100007F:1628 0100007F:D431 01 00000000:00000000 00:00000000 00000000   999        0 31338 1\n";
    ensure!(
        listening_inodes(table, 5672) == vec![31337],
        "/proc/net/tcp parsing"
    );
    ensure!(
        amqp_host_port("amqp://guest:guest@127.0.0.1:5672/%2f") == Some(("127.0.0.1".into(), 5672))
            && amqp_host_port("amqps://u:p@Broker.example/vh")
                == Some(("broker.example".into(), 5671))
            && amqp_host_port("amqp://[::1]:5673") == Some(("::1".into(), 5673)),
        "AMQP URL parsing"
    );
    let own = std::process::id();
    // Spin until this process's counter moves (one tick is 10 ms at 100 Hz); a busy machine only makes it longer.
    let before = cpu_ticks(own)?;
    let spin = std::time::Instant::now();
    let mut sum = 0u64;
    let after = loop {
        for _ in 0..100_000 {
            sum = sum.wrapping_add(std::hint::black_box(sum) | 1);
        }
        let now = cpu_ticks(own)?;
        if now > before || spin.elapsed() > std::time::Duration::from_secs(5) {
            break now;
        }
    };
    std::hint::black_box(sum);
    ensure!(
        after > before,
        "this process's CPU ticks did not move over 5 s of spinning ({before} → {after})"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    match listener_pid(port) {
        Some(pid) if pid == own => Ok(()),
        Some(pid) => {
            bail!("the bench's own listener on port {port} was found as process {pid}, not {own}")
        }
        None => bail!("the bench's own listener on port {port} was not found through /proc"),
    }
}

/// The processes one measurement follows, by name (a `None` pid is a process not found: its figure is `None`).
pub struct CpuMeter {
    processes: Vec<(String, Option<u32>)>,
}

/// Ticks of every followed process at one moment.
pub struct CpuSample(Vec<Option<u64>>);

impl CpuMeter {
    pub fn new(processes: impl IntoIterator<Item = (String, Option<u32>)>) -> CpuMeter {
        CpuMeter {
            processes: processes.into_iter().collect(),
        }
    }

    /// Reads every process's ticks now.
    pub fn sample(&self) -> CpuSample {
        CpuSample(
            self.processes
                .iter()
                .map(|(_, pid)| pid.and_then(|pid| cpu_ticks(pid).ok()))
                .collect(),
        )
    }

    /// CPU seconds each process spent between two samples.
    pub fn spent(&self, before: &CpuSample, after: &CpuSample) -> BTreeMap<String, Option<f64>> {
        let hz = ticks_per_second() as f64;
        self.processes
            .iter()
            .zip(before.0.iter().zip(&after.0))
            .map(|((name, _), (b, a))| {
                let seconds = match (b, a) {
                    (Some(b), Some(a)) if a >= b => Some((a - b) as f64 / hz),
                    _ => None,
                };
                (name.clone(), seconds)
            })
            .collect()
    }
}
