//! Record and replay: a run's schedule (each meter's start time, link draw and seed) and its
//! outcomes, as one JSON document. Replaying re-runs exactly the same schedule, against any server.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::driver::MeterOutcome;
use crate::fleet::Summary;
use crate::link::LinkParams;
use crate::schedule::{Arrival, MeterPlan};

/// Format version of the record file.
pub const RECORD_VERSION: u32 = 1;

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    pub version: u32,
    pub seed: u64,
    pub arrival: Arrival,
    /// The base link before per-meter hop draws.
    pub link: LinkParams,
    pub max_hops: u32,
    pub meters_per_dcu: Option<u64>,
    pub dcu_link: LinkParams,
    /// How the DCUs carried the traffic (recordings before issue #12: router).
    #[serde(default)]
    pub dcu_mode: crate::net::DcuMode,
    /// The server the run was recorded against (informational).
    pub server: String,
    pub meters: Vec<MeterPlan>,
    /// Filled after the run (empty in a schedule-only file).
    #[serde(default)]
    pub outcomes: Vec<MeterOutcome>,
    #[serde(default)]
    pub summary: Option<Summary>,
}

/// Errors reading or writing a record file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a client-sim recording: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: record format version {found}, this build reads {RECORD_VERSION}")]
    Version { path: String, found: u32 },
}

impl Recording {
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let p = path.display().to_string();
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Json {
            path: p.clone(),
            source,
        })?;
        std::fs::write(path, bytes).map_err(|source| RecordError::Io { path: p, source })
    }

    pub fn read(path: &Path) -> Result<Recording, RecordError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
            path: p.clone(),
            source,
        })?;
        let rec: Recording =
            serde_json::from_slice(&bytes).map_err(|source| RecordError::Json {
                path: p.clone(),
                source,
            })?;
        if rec.version != RECORD_VERSION {
            return Err(RecordError::Version {
                path: p,
                found: rec.version,
            });
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::link::LinkProfile;
    use crate::schedule::{build_schedule, FleetPlan};
    use std::time::Duration;

    #[test]
    fn record_file_round_trip_reproduces_the_schedule() {
        let plan = FleetPlan {
            arrival: Arrival::Poisson { rate_per_s: 20.0 },
            link: LinkParams::profile(LinkProfile::Plc),
            max_hops: 3,
            meters_per_dcu: Some(4),
        };
        let serials: Vec<String> = (0..10).map(|i| format!("SN{i:06}")).collect();
        let meters = build_schedule(&plan, &serials, 7);
        let mut outcome = crate::driver::MeterOutcome {
            index: 0,
            serial: "SN000000".into(),
            enrolled: false,
            renewed: false,
            failure: Some(crate::meter::FailureReason::Rejected {
                resource: "/sen".into(),
                code: "4.03".into(),
            }),
            stats: Default::default(),
            coap: Default::default(),
            link_up: Default::default(),
            link_down: Default::default(),
            ldevid_sha256: None,
            ldevid_serial: None,
            nat_rebinds: 0,
            phases: Default::default(),
        };
        outcome.stats.handshake_us = Some(1234);
        let rec = Recording {
            version: RECORD_VERSION,
            seed: 7,
            arrival: plan.arrival,
            link: plan.link.clone(),
            max_hops: plan.max_hops,
            meters_per_dcu: plan.meters_per_dcu,
            dcu_link: LinkParams::profile(LinkProfile::Cellular),
            dcu_mode: crate::net::DcuMode::RelayStateless,
            server: "127.0.0.1:5684".into(),
            meters: meters.clone(),
            outcomes: vec![outcome],
            summary: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        rec.write(&path).unwrap();
        let back = Recording::read(&path).unwrap();
        assert_eq!(back, rec);
        // The recorded schedule is what the seed produces.
        assert_eq!(back.meters, build_schedule(&plan, &serials, 7));
        assert!(back
            .meters
            .iter()
            .all(|m| m.link.latency >= Duration::from_millis(400)));
        // Version check.
        let mut v2 = serde_json::to_value(&rec).unwrap();
        v2["version"] = 99.into();
        std::fs::write(&path, v2.to_string()).unwrap();
        assert!(matches!(
            Recording::read(&path),
            Err(RecordError::Version { found: 99, .. })
        ));
        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(
            Recording::read(&path),
            Err(RecordError::Json { .. })
        ));
    }
}
