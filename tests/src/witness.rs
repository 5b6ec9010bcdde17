//! [`WitnessProcess`]: the `relay-witness` binary as a child process on loopback, in its own temporary data
//! directory, that can be killed and restarted on the same address and data directory (its state must survive).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use relay_quic::ready::{ReadyLine, ServerChild};

/// A `relay-witness` child process witnessing the logs whose keys it was given.
pub struct WitnessProcess {
    dir: tempfile::TempDir,
    log_keys: Vec<String>,
    addr: SocketAddr,
    fingerprint: String,
    public_key: String,
    child: Option<ServerChild>,
}

impl WitnessProcess {
    /// Starts a witness of the logs with hex keys `log_keys` on a free loopback port.
    pub async fn start(log_keys: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut witness = Self {
            dir,
            log_keys: log_keys.iter().map(|k| (*k).to_owned()).collect(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            fingerprint: String::new(),
            public_key: String::new(),
            child: None,
        };
        witness.public_key = witness.read_public_key().await?;
        witness.spawn().await?;
        Ok(witness)
    }

    /// `relay-witness --data DIR public-key`.
    async fn read_public_key(&self) -> Result<String> {
        let mut command = tokio::process::Command::new(crate::binary_path("relay-witness", "RELAY_WITNESS_BIN")?);
        command.arg("--data").arg(self.data_dir()).arg("public-key").kill_on_drop(true);
        let out = tokio::time::timeout(crate::START_TIMEOUT, command.output())
            .await
            .context("relay-witness public-key did not exit in time")??;
        if !out.status.success() {
            bail!("relay-witness public-key failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut command = tokio::process::Command::new(crate::binary_path("relay-witness", "RELAY_WITNESS_BIN")?);
        command.arg("--data").arg(self.data_dir()).arg("--listen").arg(self.addr.to_string());
        for key in &self.log_keys {
            command.arg("--log-key").arg(key);
        }
        command.env("RUST_LOG", "info");
        let (child, ready) = ServerChild::start(command, &self.log_path(), crate::START_TIMEOUT).await?;
        let ReadyLine::Relay { addr, .. } = ready else { bail!("relay-witness printed {ready}") };
        let fingerprint = ready.cert_hex();
        if !self.fingerprint.is_empty() && fingerprint != self.fingerprint {
            bail!("relay-witness changed identity across a restart");
        }
        (self.addr, self.fingerprint) = (addr, fingerprint);
        self.child = Some(child);
        Ok(())
    }

    /// Kills it with SIGKILL: no shutdown code runs.
    pub async fn kill(&mut self) -> Result<()> {
        let child = self.child.take().ok_or_else(|| anyhow!("the witness is not running"))?;
        child.kill().await?;
        Ok(())
    }

    /// Stops it cleanly (SIGTERM), waiting at most `bound`.
    pub async fn stop(&mut self, bound: Duration) -> Result<()> {
        let child = self.child.take().ok_or_else(|| anyhow!("the witness is not running"))?;
        let exit = child.terminate(bound).await?;
        if !exit.success() {
            bail!("relay-witness exited with {exit}; see {}", self.log_path().display());
        }
        Ok(())
    }

    /// Starts it again on the same address and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the witness is still running");
        }
        self.spawn().await
    }

    /// `ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX`: how the exporter and `relay-audit --witness` name it.
    pub fn spec(&self) -> String {
        format!("{},{},{}", self.addr, self.fingerprint, self.public_key)
    }

    /// Its public key, hex: what `--witness-key` takes.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Its data directory.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Its stderr log, across restarts.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("witness.log")
    }
}
