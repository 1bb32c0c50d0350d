//! EST errors and the one place where they become CoAP responses.

use coap_lite::ResponseType;

use crate::coap::Response;
use crate::policy::PolicyError;

/// Everything that can go wrong while serving an EST-coaps request. The mapping to the
/// wire is [`EstError::to_response`] and nowhere else (RFC 9148 §4.5, RFC 7252 §5.9).
#[derive(Debug, thiserror::Error)]
pub enum EstError {
    /// 4.00: the request payload is not a well-formed, correctly self-signed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 4.03: the enrollment policy refused.
    #[error("forbidden: {0}")]
    Forbidden(#[from] PolicyError),
    /// 4.04: no such resource.
    #[error("not found")]
    NotFound,
    /// 4.05: the resource exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 4.06: nothing we can produce matches Accept (RFC 7252 §5.10.4).
    #[error("not acceptable: Accept {0}")]
    NotAcceptable(u16),
    /// 4.13: the request payload exceeds a configured limit.
    #[error("request too large ({size} > {limit} bytes)")]
    TooLarge { size: usize, limit: usize },
    /// 4.15: the request's Content-Format is not one this resource takes.
    #[error("unsupported Content-Format {}", .0.map_or_else(|| "(none)".to_string(), |c| c.to_string()))]
    UnsupportedContentFormat(Option<u16>),
    /// 5.03 + Max-Age: issuance is overloaded, retry later (RFC 9148 §4.7).
    #[error("overloaded, retry in {retry_after_seconds} s")]
    Overloaded { retry_after_seconds: u32 },
    /// 5.03 + Max-Age: the store could not be read or could not commit; nothing was issued
    /// to the meter, which retries later. The detail is logged, not sent.
    #[error("storage unavailable, retry in {retry_after_seconds} s")]
    StoreUnavailable {
        retry_after_seconds: u32,
        detail: String,
    },
    /// 5.03 + Max-Age: the issuing CA cannot sign now (its certificate expired or is not
    /// yet valid by our clock). The diagnostic says which, so that a meter's log tells the
    /// operator; nothing is issued until the CA is renewed (or the clock fixed).
    #[error("{detail}; retry in {retry_after_seconds} s")]
    CaUnavailable {
        retry_after_seconds: u32,
        detail: String,
    },
    /// 5.03 + Max-Age: the device reached `[enrollment] max_per_device_per_period`; Max-Age
    /// is when its oldest enrollment in the period leaves it.
    #[error("enrollment rate limit: {limit} per {period_secs} s for this device, retry in {retry_after_seconds} s")]
    RateLimited {
        retry_after_seconds: u32,
        limit: u32,
        period_secs: u64,
    },
    /// 5.00: our own failure (storage, signing). Details are logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EstError {
    /// The CoAP code a meter sees for this error.
    pub fn code(&self) -> ResponseType {
        match self {
            EstError::BadRequest(_) => ResponseType::BadRequest,
            EstError::Forbidden(_) => ResponseType::Forbidden,
            EstError::NotFound => ResponseType::NotFound,
            EstError::MethodNotAllowed => ResponseType::MethodNotAllowed,
            EstError::NotAcceptable(_) => ResponseType::NotAcceptable,
            EstError::TooLarge { .. } => ResponseType::RequestEntityTooLarge,
            EstError::UnsupportedContentFormat(_) => ResponseType::UnsupportedContentFormat,
            EstError::Overloaded { .. }
            | EstError::StoreUnavailable { .. }
            | EstError::CaUnavailable { .. }
            | EstError::RateLimited { .. } => ResponseType::ServiceUnavailable,
            EstError::Internal(_) => ResponseType::InternalServerError,
        }
    }

    /// The response: the code, a short diagnostic payload (RFC 7252 §5.5.2, UTF-8 text
    /// without Content-Format), and Max-Age for 5.03.
    pub fn to_response(&self) -> Response {
        let diagnostic = match self {
            // Never leak internal details to the network; they are logged by the caller.
            EstError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let mut r = Response::diagnostic(self.code(), &diagnostic);
        if let EstError::Overloaded {
            retry_after_seconds,
        }
        | EstError::StoreUnavailable {
            retry_after_seconds,
            ..
        }
        | EstError::CaUnavailable {
            retry_after_seconds,
            ..
        }
        | EstError::RateLimited {
            retry_after_seconds,
            ..
        } = self
        {
            r.max_age = Some(*retry_after_seconds);
        }
        r
    }

    /// `4.03`-style text for the audit log.
    pub fn code_text(&self) -> String {
        code_text(self.code())
    }
}

/// `2.04`-style text of a response code.
pub fn code_text(code: ResponseType) -> String {
    let n: u8 = coap_lite::MessageClass::Response(code).into();
    format!("{}.{:02}", n >> 5, n & 0x1f)
}
