//! Extra RabbitMQ nodes of the tests' own, beside the machine's broker (`rabbit@localhost` on 127.0.0.1:5672, which
//! is never stopped or reconfigured): separate brokers, as two organisations run them, and a three-node cluster.
//!
//! Each node has its own config file (the system one pins port 5672), node name, AMQP and distribution ports (free
//! ones, picked here), data and log directory. Nodes are started on first use, once per test binary, all the nodes
//! a call needs at the same time (about 10–20 s); tests share them and keep to their own queue prefixes.
//!
//! Stopped whatever happens: a detached watcher shell polls this process's pid and, once it is gone (the tests
//! ended, panicked or were killed), stops every node it started and removes its directory.
//!
//! Tests that stop a node (`stop_app`) must start it again before they end, and should hold the node's
//! [`Node::exclusive`] guard meanwhile so that no other test uses a node that is down.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{is_root, on_exit, run};

/// How many separate brokers [`separate`] offers.
pub const SEPARATE: usize = 2;

/// One extra RabbitMQ node.
pub struct Node {
    /// Its Erlang node name (`pbt-…@localhost`).
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its directory (config, plugins file, data, logs).
    pub dir: PathBuf,
    /// Held by a test while it stops and restarts this node.
    lock: tokio::sync::Mutex<()>,
}

/// A three-node cluster.
pub struct Cluster {
    pub nodes: [&'static Node; 3],
}

static SEPARATE_NODES: OnceLock<Vec<&'static Node>> = OnceLock::new();
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Separate broker number `i` (0-based, below [`SEPARATE`]), each a single node of its own with the shovel plugin
/// enabled. The first call starts all of them (blocking).
pub fn separate(i: usize) -> &'static Node {
    assert!(i < SEPARATE, "only {SEPARATE} separate test brokers");
    SEPARATE_NODES.get_or_init(|| {
        let id = run_id();
        let names: Vec<String> = (0..SEPARATE).map(|n| format!("pbt-{id}-s{n}")).collect();
        start_nodes(&names, &["rabbitmq_shovel"])
    })[i]
}

/// The three-node cluster, started and joined on first call (blocking).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let id = run_id();
        let names: Vec<String> = (1..=3).map(|n| format!("pbt-{id}-c{n}")).collect();
        let nodes = start_nodes(&names, &[]);
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &nodes[0].name]);
            node.ctl(&["start_app"]);
            node.await_startup();
        }
        let cluster = Cluster {
            nodes: [nodes[0], nodes[1], nodes[2]],
        };
        cluster.await_members(3);
        cluster
    })
}

impl Node {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in from anywhere: `loopback_users = none`).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n <node> args…`, failing the test when it fails; returns its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.cli("rabbitmqctl", args)
    }

    /// Runs a RabbitMQ command-line tool (`rabbitmqctl`, `rabbitmq-queues`, …) against this node.
    pub fn cli(&self, tool: &str, args: &[&str]) -> String {
        let out = self
            .cli_command(tool, args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} -n {} {}: {}{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The same as [`Node::cli`], from async code.
    pub async fn cli_async(&'static self, tool: &'static str, args: Vec<String>) -> String {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.cli(tool, &args)
        })
        .await
        .expect("cli task")
    }

    fn cli_command(&self, tool: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(tool);
        cmd.args(["-q", "-n", &self.name])
            .args(args)
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .stdin(Stdio::null());
        cmd
    }

    /// Stops the RabbitMQ application on this node (the Erlang node stays up, so [`Node::start_app`] is quick).
    /// Clients connected to it are disconnected.
    pub async fn stop_app(&'static self) {
        self.cli_async("rabbitmqctl", vec!["stop_app".into()]).await;
    }

    /// Starts the RabbitMQ application again and waits until it accepts connections.
    pub async fn start_app(&'static self) {
        self.cli_async("rabbitmqctl", vec!["start_app".into()])
            .await;
        tokio::task::spawn_blocking(move || self.await_startup())
            .await
            .expect("await startup");
    }

    /// Held by a test while it stops and restarts this node, so that tests using the node do not overlap with it.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Whether the AMQP port accepts connections.
    pub fn answers(&self) -> bool {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    /// Waits (up to two minutes) until the node has booted and its AMQP port answers.
    fn await_startup(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let booted = self
                .cli_command("rabbitmqctl", &["await_startup", "--timeout", "5"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if booted && self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "test RabbitMQ node {} did not start within 120 s; its log is in {}",
                self.name,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Cluster {
    /// `amqp.urls` for the bridge: every node's URL, first node first.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.amqp_url()).collect()
    }

    /// Waits until `n` nodes are running in the cluster.
    pub fn await_members(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_str::<serde_json::Value>(&status)
                .ok()
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            if running >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster has {running} running nodes, not {n}: {status}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The members of quorum queue `queue` (node names), from `rabbitmq-queues quorum_status`.
    pub fn quorum_members(&self, queue: &str) -> Vec<String> {
        let out = self.nodes[0].cli(
            "rabbitmq-queues",
            &["quorum_status", queue, "--formatter", "json"],
        );
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| {
                v.as_array().map(|rows| {
                    rows.iter()
                        .filter_map(|r| r["Node Name"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

/// A short id for this test process's node names.
fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

/// Starts the nodes `names` at the same time, with `plugins` enabled, and waits for all of them.
fn start_nodes(names: &[String], plugins: &[&str]) -> Vec<&'static Node> {
    let nodes: Vec<&'static Node> = names
        .iter()
        .map(|name| Box::leak(Box::new(prepare(name, plugins))) as &'static Node)
        .collect();
    watch(&nodes);
    for node in &nodes {
        launch(node);
    }
    for node in &nodes {
        node.await_startup();
        eprintln!(
            "test RabbitMQ node {} on 127.0.0.1:{}, directory {}",
            node.name,
            node.port,
            node.dir.display()
        );
    }
    nodes
}

/// The node's directory and config files.
fn prepare(name: &str, plugins: &[&str]) -> Node {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .expect("temporary directory")
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.join("mnesia")).unwrap();
    std::fs::create_dir_all(dir.join("log")).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("enabled_plugins"),
        format!("[{}].\n", plugins.join(",")),
    )
    .unwrap();
    if is_root() {
        run(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir),
            "chown the test node's directory",
        );
    }
    Node {
        name: format!("{name}@localhost"),
        port,
        dir,
        lock: tokio::sync::Mutex::new(()),
    }
}

/// `rabbitmq-server -detached` for the node.
fn launch(node: &Node) {
    let dist_port = free_port();
    run(
        Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        &format!("rabbitmq-server -detached ({})", node.name),
    );
}

/// The watcher: once this process is gone, however it ended, stops the nodes and removes their directories.
fn watch(nodes: &[&'static Node]) {
    let mut stops = String::new();
    for node in nodes {
        stops.push_str(&format!(
            "RABBITMQ_ENABLED_PLUGINS_FILE='{plugins}' rabbitmqctl -q -n '{name}' stop >/dev/null 2>&1; \
             rm -rf '{dir}'; ",
            plugins = node.dir.join("enabled_plugins").display(),
            name = node.name,
            dir = node.dir.display()
        ));
    }
    on_exit(&stops, "the test RabbitMQ nodes");
}
