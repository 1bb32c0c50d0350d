//! Block-wise transfers on the server side (RFC 7959): atomic Block1 reassembly (§2.3, §2.5)
//! and Block2 slicing with the per-session body cache (§2.4).

use std::time::Instant;

use coap_lite::{Packet, ResponseType};
use sha2::{Digest, Sha256};

use super::super::wire::BlockOpt;
use super::super::{block_size, Method, Response};
use super::options::{RequestOptions, Target};
use super::{deadline, Pending, Reply, RequestDisposition, ServerSession};

#[derive(Debug)]
pub(super) struct Reassembly {
    pub(super) target: Target,
    pub(super) content_format: Option<u16>,
    pub(super) body: Vec<u8>,
    /// Block2 from the first request of the transfer (early negotiation, RFC 9148 App. B.2).
    pub(super) block2_early: Option<BlockOpt>,
    pub(super) expires: Instant,
}

#[derive(Debug)]
pub(super) struct Block2Cache {
    pub(super) target: Target,
    pub(super) code: ResponseType,
    pub(super) content_format: Option<u16>,
    pub(super) max_age: Option<u32>,
    pub(super) etag: Vec<u8>,
    pub(super) body: Vec<u8>,
    pub(super) expires: Instant,
}

impl ServerSession {
    /// Atomic Block1 reassembly (RFC 7959 §2.3, §2.5).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block1(
        &mut self,
        now: Instant,
        method: Method,
        opts: &RequestOptions,
        target: Target,
        b1: BlockOpt,
        packet: &Packet,
        pending: impl FnOnce(BlockOpt, Option<BlockOpt>) -> Pending,
    ) -> RequestDisposition {
        self.stats.block1_received += 1;
        let max = self.config.max_request_body_bytes;
        if opts.block2.is_some_and(|b| b.num > 0) {
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::BadRequest,
                "Block2 NUM > 0 with Block1",
            ));
        }
        // RFC 7959 §4: Size1 in a request announces the total size; 4.13 early if too big.
        if opts.size1.is_some_and(|s| u64::from(s) > max as u64) {
            self.reassembly = None;
            return RequestDisposition::Reply(too_large(max));
        }
        // RFC 7959 §2.3: with M=1 the payload is exactly the block size; the last block
        // carries at most one block.
        let payload = &packet.payload;
        let size = b1.size();
        if (b1.more && payload.len() != size) || payload.len() > size {
            self.reassembly = None;
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::BadRequest,
                "Block1 payload size does not match SZX",
            ));
        }
        if b1.num == 0 {
            // A new transfer replaces any earlier one (one reassembly per session).
            self.reassembly = Some(Reassembly {
                target: target.clone(),
                content_format: opts.content_format,
                body: Vec::new(),
                block2_early: opts.block2,
                expires: now,
            });
        }
        let Some(r) = self.reassembly.as_mut() else {
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::RequestEntityIncomplete,
                "no Block1 transfer in progress",
            ));
        };
        if r.target != target {
            self.reassembly = None;
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::RequestEntityIncomplete,
                "Block1 for another resource",
            ));
        }
        // RFC 7959 §2.3: mismatching Content-Format must not be assembled (4.08).
        if r.content_format != opts.content_format {
            self.reassembly = None;
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::RequestEntityIncomplete,
                "Content-Format changed",
            ));
        }
        // RFC 7959 §2.3: missing or out-of-order block -> 4.08.
        if b1.offset() != r.body.len() as u64 {
            self.reassembly = None;
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::RequestEntityIncomplete,
                "missing or out-of-order block",
            ));
        }
        if r.body.len().saturating_add(payload.len()) > max {
            self.reassembly = None;
            return RequestDisposition::Reply(too_large(max));
        }
        r.body.extend_from_slice(payload);
        r.expires = deadline(now, self.config.exchange_lifetime);
        if opts.block2.is_some() {
            r.block2_early = opts.block2;
        }
        if b1.more {
            // 2.31 Continue echoing the block (RFC 7959 §2.3); with a smaller SZX when we
            // want smaller blocks (control usage, Figure 4): NUM is re-expressed in our
            // block size so that offset = NUM x size still holds.
            let szx = b1.szx.min(self.config.max_block1_szx.min(6));
            let num =
                u32::try_from(b1.offset() >> (u32::from(szx) + 4)).unwrap_or(BlockOpt::MAX_NUM);
            let mut reply = Reply::new(ResponseType::Continue);
            reply.block1 = Some(BlockOpt::new(num, true, szx));
            self.stats.continues_sent += 1;
            return RequestDisposition::Reply(reply);
        }
        let Some(done) = self.reassembly.take() else {
            return RequestDisposition::Reply(Reply::diag(
                ResponseType::InternalServerError,
                "reassembly lost",
            ));
        };
        let mut request = opts.clone().into_request(method, Vec::new());
        request.payload = done.body;
        let echo = BlockOpt::new(b1.num, false, b1.szx);
        RequestDisposition::Deliver(request, pending(echo, done.block2_early))
    }

    pub(super) fn serve_cached(
        &mut self,
        now: Instant,
        asked: BlockOpt,
        size2_requested: bool,
    ) -> Reply {
        let szx = asked.szx.min(self.config.max_block2_szx.min(6));
        let lifetime = self.config.exchange_lifetime;
        let Some(cache) = self.block2.as_mut() else {
            return Reply::diag(ResponseType::RequestEntityIncomplete, "Block2 body expired");
        };
        let asked = BlockOpt::new(asked.num, false, szx);
        let Some((slice, more)) = slice(&cache.body, asked) else {
            return Reply::diag(
                ResponseType::BadOption,
                "Block2 NUM beyond the end of the body",
            );
        };
        let mut reply = Reply::new(cache.code);
        reply.content_format = cache.content_format;
        reply.max_age = cache.max_age;
        reply.etag = Some(cache.etag.clone());
        reply.block2 = Some(BlockOpt::new(asked.num, more, szx));
        if size2_requested {
            reply.size2 = u32::try_from(cache.body.len()).ok();
        }
        reply.payload = slice.to_vec();
        // Keep the body EXCHANGE_LIFETIME after the last block served, not after creation.
        cache.expires = deadline(now, lifetime);
        self.stats.block2_served_from_cache += 1;
        if !more {
            // Last block served: free the body. A retransmission of this request has the
            // same Message ID and is answered from the dedup cache.
            self.block2 = None;
        }
        reply
    }

    /// The reply to request `p` carrying `response`: the whole body, or the asked Block2 slice
    /// (the first by default) when it is larger than the negotiated block size, the rest kept
    /// in the Block2 cache.
    pub(super) fn body_reply(&mut self, now: Instant, p: &Pending, response: Response) -> Reply {
        let max_szx = self.config.max_block2_szx.min(6);
        // RFC 7959 §2.4: use the size the client asked for, or smaller.
        let szx = p.block2.map_or(max_szx, |b| b.szx.min(max_szx));
        let num = p.block2.map_or(0, |b| b.num);
        let body_len = response.payload.len();
        let mut reply = Reply::new(response.code);
        reply.content_format = response.content_format;
        reply.max_age = response.max_age;
        reply.block1 = p.block1_echo;
        if body_len > block_size(szx) || num > 0 {
            let asked = BlockOpt::new(num, false, szx);
            match slice(&response.payload, asked) {
                None => {
                    reply = Reply::diag(
                        ResponseType::BadOption,
                        "Block2 NUM beyond the end of the body",
                    );
                }
                Some((part, more)) => {
                    let etag = etag(&response.payload);
                    reply.payload = part.to_vec();
                    reply.block2 = Some(BlockOpt::new(num, more, szx));
                    reply.etag = Some(etag.clone());
                    // RFC 7959 §4: Size2 tells the total size with the first block.
                    if num == 0 || p.size2_requested {
                        reply.size2 = u32::try_from(body_len).ok();
                    }
                    if more {
                        self.block2 = Some(Block2Cache {
                            target: p.target.clone(),
                            code: response.code,
                            content_format: response.content_format,
                            max_age: response.max_age,
                            etag,
                            body: response.payload,
                            expires: deadline(now, self.config.exchange_lifetime),
                        });
                    }
                }
            }
        } else {
            if p.block2.is_some() {
                reply.block2 = Some(BlockOpt::new(0, false, szx));
            }
            reply.payload = response.payload;
        }
        reply
    }
}

pub(super) fn too_large(max: usize) -> Reply {
    // RFC 7252 §5.9.2.9 / RFC 7959 §2.9.3: 4.13 SHOULD carry Size1 = the largest size.
    let mut r = Reply::diag(
        ResponseType::RequestEntityTooLarge,
        "request body too large",
    );
    r.size1 = Some(u32::try_from(max).unwrap_or(u32::MAX));
    r
}

/// The bytes of block `asked` and whether more follow; `None` if the block starts beyond
/// the end (a block starting exactly at the end is only valid as NUM 0 of an empty body).
fn slice(body: &[u8], asked: BlockOpt) -> Option<(&[u8], bool)> {
    let start = usize::try_from(asked.offset()).ok()?;
    if start > body.len() || (start == body.len() && asked.num > 0) {
        return None;
    }
    let end = start.saturating_add(asked.size()).min(body.len());
    Some((body.get(start..end)?, end < body.len()))
}

/// ETag for a sliced body: first 8 bytes of its SHA-256 (stable across re-runs of a safe
/// request that produce the same body).
fn etag(body: &[u8]) -> Vec<u8> {
    let digest = Sha256::digest(body);
    digest.get(..8).map(<[u8]>::to_vec).unwrap_or_default()
}
