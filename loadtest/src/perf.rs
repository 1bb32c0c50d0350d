//! `perf record` of the server during a step, and its flat profile grouped by component.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::report::{self, PerfProfile, Report};
use crate::server;
use crate::steps::StepResult;

/// `perf record -g` on the server for the step's window (started after the warm-up).
pub(crate) fn start_perf(
    pid: u32,
    out: &Path,
    stem: &str,
    delay: Duration,
    window: Duration,
) -> Option<std::thread::JoinHandle<Result<()>>> {
    server::on_path("perf")?;
    let data = out.join(format!("{stem}.data"));
    Some(std::thread::spawn(move || {
        std::thread::sleep(delay);
        let st = std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-q", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string(), "--", "sleep"])
            .arg(format!("{:.1}", window.as_secs_f64()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("running perf record")?;
        if !st.success() {
            bail!("perf record failed ({st})");
        }
        Ok(())
    }))
}

/// Waits for `perf record`, writes OUT/STEM-report.txt and returns the step's profile.
pub(crate) fn finish_perf(
    h: std::thread::JoinHandle<Result<()>>,
    out: &Path,
    stem: &str,
    step: &StepResult,
) -> Result<PerfProfile> {
    h.join()
        .map_err(|_| anyhow::anyhow!("perf thread panicked"))??;
    let rep = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.01",
            "--sort",
            "dso,symbol",
            "-g",
            "none",
            "-i",
        ])
        .arg(out.join(format!("{stem}.data")))
        .output()
        .context("running perf report")?;
    let path = out.join(format!("{stem}-report.txt"));
    std::fs::write(&path, &rep.stdout)?;
    let text = String::from_utf8_lossy(&rep.stdout);
    Ok(PerfProfile {
        mode: step.mode.clone(),
        concurrency: step.concurrency,
        report_path: path.display().to_string(),
        server_cpu_ms_per_op: step.server_cpu_ms_per_op,
        components: perf_categories(&text),
    })
}

/// "PATH (component 12.3%, ...)" for the report's notes.
pub(crate) fn perf_summary(p: &PerfProfile) -> String {
    let parts: Vec<String> = p
        .components
        .iter()
        .map(|(name, pct)| format!("{name} {pct:.1}%"))
        .collect();
    format!("{} ({})", p.report_path, parts.join(", "))
}

/// Groups a flat `perf report --sort dso,symbol` by where the time goes.
pub(crate) fn perf_categories(report: &str) -> Vec<(String, f64)> {
    let mut acc: std::collections::BTreeMap<&'static str, f64> = std::collections::BTreeMap::new();
    for line in report.lines() {
        let l = line.trim_start();
        let Some((pct, rest)) = l.split_once('%') else {
            continue;
        };
        let Ok(pct) = pct.trim().parse::<f64>() else {
            continue;
        };
        let has = |keys: &[&str]| keys.iter().any(|k| rest.contains(k));
        let cat = if has(&[
            "aes_hw", "aesni", "gcm_", "ghash", "ccm", "Ccm", "aes::", "vpaes",
        ]) {
            "AEAD (AES-CCM_8, AES-GCM)"
        } else if has(&[
            "sha256_block",
            "sha512_block",
            "sha2::",
            "hmac",
            "prf",
            "digest::",
        ]) {
            "SHA-2 / HMAC / PRF"
        } else if has(&["nistz256", "ring_core", "ring::"]) {
            "ring P-256 (ECDHE, ECDSA sign/verify)"
        } else if has(&["p256::", "primeorder", "elliptic_curve"]) {
            "p256 0.13 (RustCrypto curve arithmetic)"
        } else if has(&[
            "sqlite3",
            "yy_reduce",
            "pcache1",
            "wal",
            "resolveExpr",
            "keywordCode",
            "Vdbe",
            "btree",
        ]) {
            "SQLite"
        } else if has(&["[kernel"]) {
            "kernel (syscalls, scheduling, UDP, fsync)"
        } else if has(&[
            "malloc",
            "free",
            "_int_",
            "unlink_chunk",
            "realloc",
            "calloc",
            "__rust_alloc",
            "__rust_dealloc",
            "memmove",
            "memcpy",
            "memset",
            "memcmp",
        ]) {
            "allocation and copies"
        } else if has(&["est_dtls"]) {
            "est-dtls records, parsing and handshake state"
        } else if has(&["yasna", "rcgen"]) {
            "rcgen certificate encoding (webrtc-dtls throw-away certs)"
        } else if has(&["webrtc_dtls", "webrtc_util"]) {
            "webrtc-dtls records and handshake state"
        } else if has(&["der::", "const_oid", "x509_cert", "spki::"]) {
            "DER / X.509 encoding"
        } else if has(&["est_server", "est_proto", "coap_lite"]) {
            "est-server / est-proto"
        } else if has(&["tokio", "parking_lot", "futures", "poll_fn"]) {
            "tokio runtime and sync"
        } else {
            "other"
        };
        *acc.entry(cat).or_default() += pct;
    }
    let mut v: Vec<(String, f64)> = acc.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// With both profiles: per component, what a full enrollment costs the server beyond a bare
/// handshake+GET, in ms per operation.
pub(crate) fn est_over_handshake_note(r: &Report) -> Option<String> {
    let enroll = r.perf.iter().find(|p| p.mode == "enroll")?;
    let hs = r.perf.iter().find(|p| p.mode == "discover")?;
    if enroll.concurrency != hs.concurrency {
        return None;
    }
    let total = enroll.server_cpu_ms_per_op? - hs.server_cpu_ms_per_op?;
    let parts: Vec<String> = report::est_over_handshake(enroll, hs)
        .iter()
        .filter(|(_, d)| d.abs() >= 0.0005)
        .map(|(name, d)| format!("{name} {d:+.3}"))
        .collect();
    Some(format!(
        "server CPU of a full enrollment beyond a bare handshake+GET ({} meters): {total:+.3} ms per operation, by component (ms): {}",
        enroll.concurrency,
        parts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn perf_report_lines_are_grouped_by_component() {
        let cats = perf_categories(
            "# x\n     9.78%  est-server  [.] __ecp_nistz256_mul_montx\n     8.18%  est-server  [.] p256::arithmetic::field::field_impl::fe_mul\n     1.00%  [kernel.kallsyms]  [k] finish_task_switch\n     0.50%  est-server  [.] foo\n",
        );
        assert!(
            cats.first().is_some_and(|c| c.0.starts_with("ring")),
            "{cats:?}"
        );
        assert_eq!(cats.len(), 4);
        // The engine's cost split: AEAD, hashing, curve work and its own code apart.
        let cats = perf_categories(
            "     5.00%  est-server  [.] ring_core_0_17_14_aes_hw_ctr32_encrypt_blocks\n     4.00%  est-server  [.] ring_core_0_17_14_sha256_block_data_order_avx2\n     3.00%  est-server  [.] est_dtls::wire::parse_record\n     2.00%  est-server  [.] <aes::ni::Aes128Enc as cipher::BlockEncrypt>::encrypt_with_backend\n",
        );
        let names: Vec<&str> = cats.iter().map(|c| c.0.as_str()).collect();
        assert!(names.iter().any(|n| n.starts_with("AEAD")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("SHA-2")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("est-dtls")), "{names:?}");
        assert_eq!(cats.len(), 3);
    }
}
