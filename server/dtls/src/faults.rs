//! Fault injection for negative tests (cargo feature `danger-test-faults`, off by default).
//!
//! The client state machine calls the hooks below at the points where a broken or hostile peer
//! would deviate; without the feature every hook is the identity and compiles away, and
//! [`TestFaults`] does not exist. The engine's own tests turn the feature on through a
//! dev-dependency on the crate itself; nothing else should.

use std::borrow::Cow;

use crate::config::ClientConfig;
use crate::wire::ClientHello;

/// What a client with faults does wrong (all off by default).
#[cfg(feature = "danger-test-faults")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestFaults {
    /// Flip a bit of the client Finished verify_data (the record around it is sealed correctly,
    /// so only the Finished check can catch it).
    pub corrupt_finished: bool,
    /// Sign the CertificateVerify over the transcript with its last byte changed.
    pub sign_wrong_transcript: bool,
    /// Send this ECDHE public value in the ClientKeyExchange instead of ours.
    pub client_point: Option<Vec<u8>>,
    /// Leave extended_master_secret out of the ClientHello.
    pub omit_ems: bool,
    /// ClientHello.client_version to send instead of DTLS 1.2.
    pub client_version: Option<[u8; 2]>,
    /// ClientHello.compression_methods to send instead of `[0]`.
    pub compression_methods: Option<Vec<u8>>,
}

#[cfg(feature = "danger-test-faults")]
mod hooks {
    use super::*;

    pub(crate) fn client_hello(config: &ClientConfig, mut ch: ClientHello) -> ClientHello {
        let f = &config.danger_faults;
        if f.omit_ems {
            ch.extensions
                .retain(|e| e.typ != crate::wire::extension_type::EXTENDED_MASTER_SECRET);
        }
        if let Some(v) = f.client_version {
            ch.client_version = v;
        }
        if let Some(c) = &f.compression_methods {
            ch.compression_methods = c.clone();
        }
        ch
    }

    pub(crate) fn client_point(config: &ClientConfig, ours: Vec<u8>) -> Vec<u8> {
        config.danger_faults.client_point.clone().unwrap_or(ours)
    }

    pub(crate) fn certificate_verify_input<'a>(
        config: &ClientConfig,
        transcript: &'a [u8],
    ) -> Cow<'a, [u8]> {
        if !config.danger_faults.sign_wrong_transcript {
            return Cow::Borrowed(transcript);
        }
        let mut v = transcript.to_vec();
        if let Some(last) = v.last_mut() {
            *last ^= 0x01;
        }
        Cow::Owned(v)
    }

    pub(crate) fn finished(config: &ClientConfig, mut verify_data: [u8; 12]) -> [u8; 12] {
        if config.danger_faults.corrupt_finished {
            verify_data[0] ^= 0x80;
        }
        verify_data
    }
}

#[cfg(not(feature = "danger-test-faults"))]
mod hooks {
    use super::*;

    #[inline(always)]
    pub(crate) fn client_hello(_: &ClientConfig, ch: ClientHello) -> ClientHello {
        ch
    }

    #[inline(always)]
    pub(crate) fn client_point(_: &ClientConfig, ours: Vec<u8>) -> Vec<u8> {
        ours
    }

    #[inline(always)]
    pub(crate) fn certificate_verify_input<'a>(
        _: &ClientConfig,
        transcript: &'a [u8],
    ) -> Cow<'a, [u8]> {
        Cow::Borrowed(transcript)
    }

    #[inline(always)]
    pub(crate) fn finished(_: &ClientConfig, verify_data: [u8; 12]) -> [u8; 12] {
        verify_data
    }
}

pub(crate) use hooks::*;
