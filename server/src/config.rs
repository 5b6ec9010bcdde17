//! Relay configuration: a TOML file (every key optional) overridden by command-line flags, with documented defaults
//! and one `check()` that rejects bad combinations before the relay starts.
//!
//! ```toml
//! listen = "127.0.0.1:4433"
//! data_dir = "./relay-data"
//!
//! [limits]
//! max_envelope_bytes = 65536          # largest envelope accepted by `Send`
//! mailbox_max_messages = 10000        # per-recipient quota, messages
//! mailbox_max_bytes = 67108864        # per-recipient quota, envelope bytes (64 MiB)
//! message_ttl_secs = 2592000          # undelivered envelopes expire after 30 days
//! expiry_sweep_secs = 60              # how often expired envelopes are removed
//! lookups_per_minute = 60             # phone lookups and bundle fetches per account (burst = the same number)
//! sealed_sends_per_minute = 600       # sealed-sender sends per recipient (burst = the same number)
//! sends_per_second = 100              # authenticated sends per account (burst = twice the number)
//! registrations_per_minute_per_ip = 30  # Register requests per client address (IPv6: per /64), burst the same
//! max_connections_per_ip = 256        # concurrent connections per client address (IPv6: per /64)
//! frame_timeout_secs = 30             # a started frame must be complete within this, or its stream is closed
//! max_streams_per_connection = 256    # concurrent bidirectional streams per connection
//! delivery_window = 256               # envelopes pushed but not yet acknowledged, per delivery stream
//! idle_timeout_secs = 60              # connection idle timeout
//! # Per-connection byte budgets (README, "Memory per connection is bounded by bytes"): with these defaults a
//! # connection costs the relay at most about 6.5 MiB however its peer behaves.
//! receive_window_bytes = 2097152      # QUIC receive window of an authenticated connection (2 MiB)
//! unauthenticated_receive_window_bytes = 1048576  # the same before `Auth`/`Register` (1 MiB)
//! frame_budget_bytes = 2097152        # bytes of partially received frames, all streams of a connection (2 MiB)
//! unauthenticated_frame_budget_bytes = 524288  # the same before `Auth`/`Register` (512 KiB)
//! send_window_bytes = 2097152         # bytes written to a connection and not yet acknowledged by its peer (2 MiB)
//! delivery_burst_bytes = 262144       # envelope bytes read from the store and written per push (256 KiB)
//! ```
//!
//! `metrics_listen = "127.0.0.1:9464"` (absent by default) serves aggregate Prometheus metrics over HTTP on that
//! TCP address; keep it on loopback or a private network.
//!
//! `export_listen = "127.0.0.1:4434"` (absent by default: off) opens the export interface, a second QUIC endpoint
//! for the metadata exporter (see `docs/exporter.md`). It requires `exporter_cert_sha256`, the hex SHA-256 of the
//! exporter's DER certificate: the only client certificate that endpoint accepts. One without the other is refused.
//!
//! ```toml
//! [registration]
//! verifier = "open"                   # "open" | "file" | "webhook=http://127.0.0.1:8085/sms" (see `verify`)
//! insecure_open_registration = false  # allow "open" on a listen address that is not loopback
//! codes_per_hour_per_number = 5       # RequestCode per phone number (burst = the same number)
//! codes_per_hour_per_ip = 30          # RequestCode per client address, IPv6 per /64 (burst = the same number)
//! ```
//!
//! `open` (first come, first served: anyone may claim any number) is refused unless `listen` is a loopback address
//! or `insecure_open_registration` is set (`relayd --insecure-open-registration`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_proto::MAX_FRAME_LEN;
use serde::{Deserialize, Serialize};

use crate::verify::VerifierSpec;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./relay-data";

/// Full relay configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory holding the sled store and the TLS certificate and key.
    pub data_dir: PathBuf,
    /// TCP address of the Prometheus metrics endpoint (`GET /metrics`); `None`, the default, serves none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// UDP address of the export interface (mutual TLS, for the metadata exporter); `None`, the default, opens none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_listen: Option<SocketAddr>,
    /// Hex SHA-256 of the exporter's DER certificate, the one client certificate the export interface accepts.
    /// Required with `export_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exporter_cert_sha256: Option<String>,
    /// Quotas and limits.
    pub limits: Limits,
    /// Phone-number verification at registration.
    pub registration: Registration,
}

/// How phone numbers are verified at registration (`[registration]`), each key with the default documented in the
/// module header.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registration {
    /// `open`, `file` or `webhook=URL`.
    #[serde(with = "verifier_text")]
    pub verifier: VerifierSpec,
    /// Accept `open` on a listen address that is not loopback.
    pub insecure_open_registration: bool,
    /// `RequestCode` requests per phone number per hour.
    pub codes_per_hour_per_number: u32,
    /// `RequestCode` requests per client address (IPv6: per /64) per hour.
    pub codes_per_hour_per_ip: u32,
}

impl Default for Registration {
    fn default() -> Self {
        Self {
            verifier: VerifierSpec::Open,
            insecure_open_registration: false,
            codes_per_hour_per_number: 5,
            codes_per_hour_per_ip: 30,
        }
    }
}

/// The verifier as its text form in TOML (`VerifierSpec`'s `Display` and `FromStr`, the same as on the command
/// line).
mod verifier_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::verify::VerifierSpec;

    pub fn serialize<S: Serializer>(v: &VerifierSpec, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VerifierSpec, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Quotas and limits, each with the default documented in the module header.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest envelope accepted, in bytes.
    pub max_envelope_bytes: usize,
    /// Most envelopes queued for one recipient.
    pub mailbox_max_messages: u64,
    /// Most envelope bytes queued for one recipient.
    pub mailbox_max_bytes: u64,
    /// Lifetime of an undelivered envelope, in seconds.
    pub message_ttl_secs: u64,
    /// Interval between sweeps of expired envelopes, in seconds.
    pub expiry_sweep_secs: u64,
    /// Phone-number lookups and prekey-bundle fetches allowed per account per minute.
    pub lookups_per_minute: u32,
    /// Sealed-sender sends accepted per recipient per minute.
    pub sealed_sends_per_minute: u32,
    /// Authenticated sends accepted per account per second (bursts of twice as many).
    pub sends_per_second: u32,
    /// `Register` requests (new accounts and updates) accepted per client address per minute.
    pub registrations_per_minute_per_ip: u32,
    /// Concurrent connections per client address; more are refused before the handshake.
    pub max_connections_per_ip: u32,
    /// Concurrent bidirectional streams a client may open on one connection.
    pub max_streams_per_connection: u32,
    /// Envelopes pushed on a delivery stream and not yet acknowledged, at most.
    pub delivery_window: usize,
    /// Idle timeout of a connection, in seconds.
    pub idle_timeout_secs: u64,
    /// Time a client has to complete a frame once it sent its first byte, in seconds.
    pub frame_timeout_secs: u64,
    /// QUIC receive window of an authenticated connection, in bytes: what its peer may send before the relay reads.
    pub receive_window_bytes: u32,
    /// QUIC receive window of a connection before it authenticates, in bytes.
    pub unauthenticated_receive_window_bytes: u32,
    /// Bytes of partially received frames the relay holds for one authenticated connection, all streams together;
    /// taken before the bytes are read out of quinn.
    pub frame_budget_bytes: usize,
    /// The same before the connection authenticates.
    pub unauthenticated_frame_budget_bytes: usize,
    /// Bytes written to one connection and not yet acknowledged by its peer (QUIC send window); past it, writes
    /// (deliveries included) wait for the peer.
    pub send_window_bytes: u64,
    /// Envelope bytes a delivery stream reads from the store and writes in one push (at least one envelope).
    pub delivery_burst_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 4433))),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            metrics_listen: None,
            export_listen: None,
            exporter_cert_sha256: None,
            limits: Limits::default(),
            registration: Registration::default(),
        }
    }
}

impl Limits {
    /// [`Limits::frame_timeout_secs`] as a duration.
    pub fn frame_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.frame_timeout_secs)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: 64 * 1024,
            mailbox_max_messages: 10_000,
            mailbox_max_bytes: 64 * 1024 * 1024,
            message_ttl_secs: 30 * 24 * 3600,
            expiry_sweep_secs: 60,
            lookups_per_minute: 60,
            sealed_sends_per_minute: 600,
            sends_per_second: 100,
            registrations_per_minute_per_ip: 30,
            max_connections_per_ip: 256,
            max_streams_per_connection: 256,
            delivery_window: 256,
            idle_timeout_secs: 60,
            frame_timeout_secs: 30,
            receive_window_bytes: 2 * 1024 * 1024,
            unauthenticated_receive_window_bytes: 1024 * 1024,
            frame_budget_bytes: 2 * 1024 * 1024,
            unauthenticated_frame_budget_bytes: 512 * 1024,
            send_window_bytes: 2 * 1024 * 1024,
            delivery_burst_bytes: 256 * 1024,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// The configuration as a TOML file.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Rejects values the relay cannot honour.
    pub fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        // An envelope travels in a Send frame with a few bytes of framing around it.
        let max_envelope = MAX_FRAME_LEN - 1024;
        if l.max_envelope_bytes == 0 || l.max_envelope_bytes > max_envelope {
            return invalid(format!("limits.max_envelope_bytes must be between 1 and {max_envelope}"));
        }
        if l.mailbox_max_messages == 0 {
            return invalid("limits.mailbox_max_messages must be at least 1".into());
        }
        if l.mailbox_max_bytes < l.max_envelope_bytes as u64 {
            return invalid("limits.mailbox_max_bytes must be at least limits.max_envelope_bytes".into());
        }
        if l.message_ttl_secs == 0 || l.expiry_sweep_secs == 0 {
            return invalid("limits.message_ttl_secs and limits.expiry_sweep_secs must be at least 1".into());
        }
        if l.lookups_per_minute == 0 || l.sealed_sends_per_minute == 0 {
            return invalid("limits.lookups_per_minute and limits.sealed_sends_per_minute must be at least 1".into());
        }
        if l.sends_per_second == 0 || l.registrations_per_minute_per_ip == 0 || l.max_connections_per_ip == 0 {
            return invalid(
                "limits.sends_per_second, limits.registrations_per_minute_per_ip and limits.max_connections_per_ip \
                 must be at least 1"
                    .into(),
            );
        }
        if !(2..=10_000).contains(&l.max_streams_per_connection) {
            return invalid("limits.max_streams_per_connection must be between 2 and 10000".into());
        }
        if !(1..=100_000).contains(&l.delivery_window) {
            return invalid("limits.delivery_window must be between 1 and 100000".into());
        }
        if !(1..=3600).contains(&l.frame_timeout_secs) {
            return invalid("limits.frame_timeout_secs must be between 1 and 3600".into());
        }
        if !(1..=3600).contains(&l.idle_timeout_secs) {
            return invalid("limits.idle_timeout_secs must be between 1 and 3600".into());
        }
        // A maximal frame (with its prefix) must be able to arrive, and its bytes to be held, before authentication.
        let frame = (MAX_FRAME_LEN + relay_proto::frame::PREFIX_LEN) as u64;
        let windows = [l.unauthenticated_receive_window_bytes, l.receive_window_bytes];
        if windows.iter().any(|w| u64::from(*w) < frame)
            || l.receive_window_bytes < l.unauthenticated_receive_window_bytes
        {
            return invalid(format!(
                "limits.unauthenticated_receive_window_bytes must be at least {frame}, and limits.receive_window_bytes \
                 at least that"
            ));
        }
        if l.unauthenticated_frame_budget_bytes < MAX_FRAME_LEN
            || l.frame_budget_bytes < l.unauthenticated_frame_budget_bytes
        {
            return invalid(format!(
                "limits.unauthenticated_frame_budget_bytes must be at least {MAX_FRAME_LEN}, and \
                 limits.frame_budget_bytes at least that"
            ));
        }
        if l.send_window_bytes < frame || l.delivery_burst_bytes == 0 {
            return invalid(format!(
                "limits.send_window_bytes must be at least {frame} and limits.delivery_burst_bytes at least 1"
            ));
        }
        let r = &self.registration;
        if r.codes_per_hour_per_number == 0 || r.codes_per_hour_per_ip == 0 {
            return invalid(
                "registration.codes_per_hour_per_number and registration.codes_per_hour_per_ip must be at least 1"
                    .into(),
            );
        }
        if r.verifier == VerifierSpec::Open && !self.listen.ip().is_loopback() && !r.insecure_open_registration {
            return invalid(format!(
                "registration.verifier is \"open\" (anyone may register any phone number) but listen {} is not a \
                 loopback address: set a verifier (\"file\" or \"webhook=URL\", relayd --verifier), or accept the \
                 risk with insecure_open_registration = true (relayd --insecure-open-registration)",
                self.listen
            ));
        }
        match (&self.export_listen, &self.exporter_cert_sha256) {
            (None, None) => {}
            (Some(_), None) => return invalid("export_listen requires exporter_cert_sha256".into()),
            (None, Some(_)) => return invalid("exporter_cert_sha256 is set but export_listen is not".into()),
            (Some(addr), Some(fp)) => {
                if self.exporter_fingerprint().is_none() {
                    return invalid(format!("exporter_cert_sha256 must be 64 hex digits, not {fp:?}"));
                }
                if *addr == self.listen && addr.port() != 0 {
                    return invalid("export_listen must differ from listen".into());
                }
            }
        }
        Ok(())
    }

    /// The pinned exporter certificate hash, if `exporter_cert_sha256` is 64 hex digits.
    pub fn exporter_fingerprint(&self) -> Option<[u8; 32]> {
        relay_quic::pin::parse_fingerprint(self.exporter_cert_sha256.as_deref()?)
    }
}

impl Limits {
    /// Message lifetime as a duration.
    pub fn message_ttl(&self) -> Duration {
        Duration::from_secs(self.message_ttl_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_check() {
        Config::default().check().expect("defaults are valid");
    }

    #[test]
    fn partial_file_keeps_defaults_and_unknown_keys_fail() {
        let c: Config = toml::from_str("[limits]\nmailbox_max_messages = 5\n").expect("valid toml");
        assert_eq!(c.limits.mailbox_max_messages, 5);
        assert_eq!(c.limits.max_envelope_bytes, Limits::default().max_envelope_bytes);
        assert!(toml::from_str::<Config>("[limits]\nmailbox_max_mesages = 5\n").is_err());
    }

    #[test]
    fn toml_round_trip() {
        let mut c = Config::default();
        c.limits.mailbox_max_messages = 7;
        let back: Config = toml::from_str(&c.to_toml().expect("serialize")).expect("parse");
        assert_eq!(back.limits.mailbox_max_messages, 7);
        assert_eq!(back.listen, c.listen);
    }

    #[test]
    fn check_rejects_impossible_values() {
        let mut c = Config::default();
        c.limits.max_envelope_bytes = MAX_FRAME_LEN;
        assert!(c.check().is_err());
        let mut c = Config::default();
        c.limits.mailbox_max_bytes = 10;
        assert!(c.check().is_err());
    }

    #[test]
    fn byte_budgets_must_leave_room_for_one_maximal_frame_and_only_grow_on_authentication() {
        let refused: [fn(&mut Limits); 6] = [
            |l| l.unauthenticated_receive_window_bytes = MAX_FRAME_LEN as u32,
            |l| l.receive_window_bytes = l.unauthenticated_receive_window_bytes - 1,
            |l| l.unauthenticated_frame_budget_bytes = MAX_FRAME_LEN - 1,
            |l| l.frame_budget_bytes = l.unauthenticated_frame_budget_bytes - 1,
            |l| l.send_window_bytes = MAX_FRAME_LEN as u64,
            |l| l.delivery_burst_bytes = 0,
        ];
        for (i, tweak) in refused.iter().enumerate() {
            let mut c = Config::default();
            tweak(&mut c.limits);
            assert!(c.check().is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn open_registration_only_on_loopback_unless_explicitly_insecure() {
        let on = |listen: &str| Config { listen: listen.parse().expect("addr"), ..Config::default() };
        on("127.0.0.1:4433").check().expect("loopback");
        on("[::1]:4433").check().expect("IPv6 loopback");
        for public in ["0.0.0.0:4433", "192.0.2.1:4433", "[::]:4433"] {
            let err = on(public).check().expect_err(public).to_string();
            assert!(err.contains("insecure-open-registration") && err.contains("--verifier"), "{err}");
            let mut c = on(public);
            c.registration.insecure_open_registration = true;
            c.check().expect("explicitly allowed");
            let mut c = on(public);
            c.registration.verifier = VerifierSpec::File;
            c.check().expect("a verifier makes any address fine");
        }
    }

    #[test]
    fn the_verifier_is_read_as_text_and_bad_ones_say_why() {
        let c: Config =
            toml::from_str("[registration]\nverifier = \"webhook=http://127.0.0.1:8085/sms\"\n").expect("toml");
        assert_eq!(c.registration.verifier.to_string(), "webhook=http://127.0.0.1:8085/sms");
        let back: Config = toml::from_str(&c.to_toml().expect("serialize")).expect("parse");
        assert_eq!(back.registration.verifier, c.registration.verifier);
        let err = toml::from_str::<Config>("[registration]\nverifier = \"sms\"\n").expect_err("unknown").to_string();
        assert!(err.contains("\"open\", \"file\" or \"webhook=URL\""), "{err}");
        let err = toml::from_str::<Config>("[registration]\nverifier = \"webhook=http://203.0.113.9/sms\"\n")
            .expect_err("not loopback")
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        let mut c = Config::default();
        c.registration.codes_per_hour_per_number = 0;
        assert!(c.check().is_err());
    }

    #[test]
    fn export_interface_needs_both_keys() {
        let addr = Some(SocketAddr::from(([127, 0, 0, 1], 4434)));
        let fp = Some("ab".repeat(32));
        let with = |listen, cert| Config { export_listen: listen, exporter_cert_sha256: cert, ..Config::default() };
        with(addr, fp.clone()).check().expect("both set");
        assert!(with(addr, None).check().is_err(), "listen without a pinned certificate");
        assert!(with(None, fp.clone()).check().is_err(), "a pinned certificate without listen");
        assert!(with(addr, Some("xyz".into())).check().is_err(), "not hex");
        assert!(with(addr, Some("ab".repeat(31))).check().is_err(), "too short");
        let c = with(addr, fp);
        let back: Config = toml::from_str(&c.to_toml().expect("serialize")).expect("parse");
        assert_eq!((back.export_listen, back.exporter_cert_sha256), (c.export_listen, c.exporter_cert_sha256));
    }
}
