//! The client side: one association to one server, sans-IO (used by client-sim and loadtest
//! as the `native` meter DTLS stack, and by the engine's own tests).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ring::rand::SystemRandom;

use crate::config::ClientConfig;
use crate::conn::{ConnEvent, Connection};
use crate::error::Error;
use crate::metrics::Metrics;

/// A client association: feed it datagrams from the server and `now`; take datagrams (to
/// [`Client::server`]), events and the next timer out.
#[derive(Debug)]
pub struct Client {
    conn: Connection,
    metrics: Metrics,
    events: VecDeque<ConnEvent>,
    transmits: VecDeque<Vec<u8>>,
}

impl Client {
    /// Starts a handshake with `server` (the first flight is ready in [`Client::poll_transmit`]).
    pub fn connect(
        now: Instant,
        server: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> Result<Client, Error> {
        let rng = SystemRandom::new();
        let conn = Connection::connect(now, server, config, &rng)?;
        let mut c = Client {
            conn,
            metrics: Metrics::default(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
        };
        c.pump();
        Ok(c)
    }

    fn pump(&mut self) {
        self.transmits.extend(self.conn.drain_outbox());
    }

    /// Where datagrams go.
    pub fn server(&self) -> SocketAddr {
        self.conn.peer_ref().socket_addr()
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn is_established(&self) -> bool {
        self.conn.is_established()
    }

    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let mut events = Vec::new();
        self.conn.handle_datagram(
            now,
            &crate::peer::PeerAddr::Direct(from),
            datagram,
            &mut self.metrics,
            &mut events,
        );
        self.events.extend(events);
        self.pump();
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut events = Vec::new();
        self.conn
            .handle_timeout(now, &mut self.metrics, &mut events);
        self.events.extend(events);
        self.pump();
    }

    /// Sends one application datagram.
    pub fn send(&mut self, now: Instant, data: &[u8]) -> Result<(), Error> {
        self.conn.send(now, data)?;
        self.pump();
        Ok(())
    }

    /// Sends one record of any content type under the current write epoch, as a broken or
    /// hostile client would (negative tests only).
    #[cfg(feature = "danger-test-faults")]
    pub fn danger_send_record(&mut self, content_type: u8, payload: &[u8]) -> Result<(), Error> {
        self.conn.danger_send_record(content_type, payload)?;
        self.pump();
        Ok(())
    }

    /// Sends close_notify.
    pub fn close(&mut self) {
        let mut events = Vec::new();
        self.conn.close(&mut self.metrics, &mut events);
        self.events.extend(events);
        self.pump();
    }
}
