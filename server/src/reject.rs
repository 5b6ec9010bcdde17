//! `Reject`: why the relay refused a request, with the stable wire code. Every internal error is mapped to a wire
//! error here and nowhere else. Messages are for humans and contain no personal data.

use relay_proto::ErrorCode;
use relay_proto::wire::ServerFrame;

use crate::store::{
    CommitError, DirectoryError, ErasureStoreError, ExportLogError, MailboxError, NoticeStoreError, PrekeyError,
    RegistryError, VerificationStoreError,
};
use crate::verify::VerifyError;

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl Reject {
    /// A reject with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The request is well-formed protobuf but makes no sense (wrong lengths, missing fields).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// The operation needs an authenticated connection.
    pub fn unauthenticated() -> Self {
        Self::new(ErrorCode::Unauthenticated, "authenticate with Auth or Register first")
    }

    /// The error frame sent to the client.
    pub fn to_frame(&self) -> ServerFrame {
        ServerFrame::error(self.code, self.message.clone())
    }

    /// The error message alone (inside a `SendRefused`).
    pub fn to_frame_error(&self) -> relay_proto::wire::Error {
        relay_proto::wire::Error { code: self.code as i32, message: self.message.clone() }
    }
}

fn storage(e: impl std::fmt::Display) -> Reject {
    tracing::error!(error = %e, "storage failure");
    Reject::new(ErrorCode::StorageUnavailable, "the relay could not store this request; nothing was acknowledged")
}

impl From<MailboxError> for Reject {
    fn from(e: MailboxError) -> Self {
        match e {
            MailboxError::QuotaExceeded { .. } => Reject::new(ErrorCode::QuotaExceeded, format!("recipient's {e}")),
            MailboxError::Store(e) => storage(e),
        }
    }
}

impl From<DirectoryError> for Reject {
    fn from(e: DirectoryError) -> Self {
        match e {
            DirectoryError::PhoneTaken | DirectoryError::HolderChanged => {
                Reject::new(ErrorCode::PhoneTaken, e.to_string())
            }
            DirectoryError::Corrupt | DirectoryError::Store(_) => storage(e),
        }
    }
}

impl From<PrekeyError> for Reject {
    fn from(e: PrekeyError) -> Self {
        match e {
            PrekeyError::Invalid(m) => Reject::invalid(m),
            PrekeyError::Corrupt | PrekeyError::Store(_) => storage(e),
        }
    }
}

impl From<ExportLogError> for Reject {
    fn from(e: ExportLogError) -> Self {
        match e {
            ExportLogError::Store(_) | ExportLogError::Corrupt => storage(e),
            ExportLogError::NoSuchHead(_) => Reject::new(ErrorCode::NotFound, e.to_string()),
            ExportLogError::KeyChanged
            | ExportLogError::HeadSize { .. }
            | ExportLogError::Merkle(_)
            | ExportLogError::Cosignature(_) => Reject::invalid(e.to_string()),
        }
    }
}

impl From<crate::fence::FenceError> for Reject {
    fn from(e: crate::fence::FenceError) -> Self {
        storage(e)
    }
}

impl From<RegistryError> for Reject {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Rejected(c) => Reject::new(ErrorCode::ConsentRejected, c.to_string()),
            RegistryError::Corrupt | RegistryError::Store(_) => storage(e),
        }
    }
}

impl From<NoticeStoreError> for Reject {
    fn from(e: NoticeStoreError) -> Self {
        match e {
            NoticeStoreError::Invalid { .. } | NoticeStoreError::Duplicate { .. } | NoticeStoreError::TooMany(_) => {
                Reject::invalid(e.to_string())
            }
            NoticeStoreError::Corrupt | NoticeStoreError::Store(_) => storage(e),
        }
    }
}

impl From<VerifyError> for Reject {
    fn from(e: VerifyError) -> Self {
        let code = match &e {
            VerifyError::NotOffered | VerifyError::Format(_) => ErrorCode::InvalidRequest,
            VerifyError::Required => ErrorCode::VerificationRequired,
            VerifyError::NoCode => ErrorCode::CodeExpired,
            VerifyError::BadCode { .. } => ErrorCode::BadCode,
            VerifyError::Locked { .. } => ErrorCode::RegistrationLocked,
            VerifyError::RateLimitedAddress(_) | VerifyError::RateLimitedNumber(_) => ErrorCode::RateLimited,
            VerifyError::Unavailable(_) => ErrorCode::VerifierUnavailable,
            VerifyError::Store(_) | VerifyError::Commit(_) | VerifyError::ShuttingDown => return storage(e),
        };
        Reject::new(code, e.to_string())
    }
}

impl From<VerificationStoreError> for Reject {
    fn from(e: VerificationStoreError) -> Self {
        storage(e)
    }
}

impl From<ErasureStoreError> for Reject {
    fn from(e: ErasureStoreError) -> Self {
        storage(e)
    }
}

impl From<CommitError> for Reject {
    fn from(e: CommitError) -> Self {
        storage(e)
    }
}

impl From<sled::Error> for Reject {
    fn from(e: sled::Error) -> Self {
        storage(e)
    }
}
