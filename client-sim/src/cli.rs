//! Command-line value parsers shared by client-sim and loadtest.

use std::time::Duration;

/// A duration with its unit (`500ms`, `10s`, `1.5m`), from 0 up to `max`.
pub fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(format!("`{s}`: expected a unit, e.g. 2s, 500ms, 1m"));
    };
    let x: f64 = num.parse().map_err(|_| format!("`{s}`: not a number"))?;
    let secs = x * scale;
    if !secs.is_finite() || !(0.0..=max.as_secs_f64()).contains(&secs) {
        return Err(format!("`{s}`: must be between 0 and {} s", max.as_secs()));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_need_a_unit_and_stay_in_range() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            parse_duration("10s", hour).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse_duration("250ms", hour).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("1.5m", hour).unwrap(),
            Duration::from_secs(90)
        );
        assert!(parse_duration("10", hour).is_err());
        assert!(parse_duration("61m", hour).is_err());
        assert!(parse_duration("-1s", hour).is_err());
    }
}
