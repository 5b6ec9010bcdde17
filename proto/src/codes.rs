//! Error codes: the stable `ErrorCode` carried in error frames, and the QUIC application codes used when a stream or
//! connection has to be closed because of what the peer sent.

pub use crate::wire::ErrorCode;
use crate::wire::{Error, ExportResponse, ServerFrame, export_response, server_frame::Body};

/// QUIC application error codes for `RESET_STREAM` / `STOP_SENDING` / `CONNECTION_CLOSE`. Stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamCloseCode {
    /// Orderly close, nothing wrong.
    Done = 0,
    /// The peer sent a malformed or unexpected frame.
    ProtocolError = 1,
    /// The peer announced a frame larger than the maximum.
    FrameTooLarge = 2,
    /// The relay is shutting down.
    Shutdown = 3,
    /// The peer exceeded a limit (streams, rate) and this stream or connection is refused.
    Refused = 4,
}

impl StreamCloseCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

impl ServerFrame {
    /// An error frame with a stable code and a human-readable message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { body: Some(Body::Error(Error { code: code as i32, message: message.into() })) }
    }
}

impl ExportResponse {
    /// An error frame of the export protocol.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { body: Some(export_response::Body::Error(Error { code: code as i32, message: message.into() })) }
    }
}

impl crate::wire::WitnessResponse {
    /// An error frame of the witness protocol.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: Some(crate::wire::witness_response::Body::Error(Error {
                code: code as i32,
                message: message.into(),
            })),
        }
    }
}

/// Prost's generated `Error::code()` maps an unknown number to `Unspecified`.
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.code().as_str_name();
        write!(f, "{} ({}): {}", name.strip_prefix("ERROR_CODE_").unwrap_or(name), self.code, self.message)
    }
}
