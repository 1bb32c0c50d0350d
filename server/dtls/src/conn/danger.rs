//! Test-only access to the record layer (cargo feature `danger-test-faults`): lets a test
//! client send what a well-behaved one never would (a renegotiating ClientHello, records of
//! any content type) under its current write epoch.

use super::Connection;
use crate::error::Error;

impl Connection {
    /// Seals `payload` as one record of `content_type` under the current write epoch and
    /// queues it.
    pub(crate) fn danger_send_record(
        &mut self,
        content_type: u8,
        payload: &[u8],
    ) -> Result<(), Error> {
        let rec = self.encode_record(content_type, self.write_epoch, payload)?;
        self.outbox.push(rec);
        Ok(())
    }
}
