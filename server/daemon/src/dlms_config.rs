//! `[[dlms.rules]]`: device-class rules selecting the `dlms` certificate profile
//! (est_proto::dlms), validated at load.

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `[dlms]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlmsSection {
    /// First match wins; devices no rule selects get the default LDevID profile.
    pub rules: Vec<DlmsRuleSection>,
}

/// One rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlmsRuleSection {
    /// IDevID serialNumber prefix selecting the rule (non-empty, printable).
    pub serial_prefix: String,
    /// The manufacturer's three-letter FLAG ID (A-Z): the system title's first 3 octets.
    pub flag_id: String,
    /// "P-256" (security suite 1) or "P-384" (suite 2): CSRs on the other curve are refused
    /// with 4.00; "" accepts both.
    pub curve: String,
}

impl DlmsSection {
    /// Field checks, naming the offending rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, r) in self.rules.iter().enumerate() {
            let bad = |m: String| ConfigError::Invalid {
                field: "dlms.rules",
                message: format!("rule {}: {m}", i + 1),
            };
            if r.serial_prefix.is_empty() || !r.serial_prefix.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(bad("serial_prefix must be non-empty printable ASCII".into()));
            }
            est_proto::dlms::parse_flag_id(&r.flag_id).map_err(|e| bad(e.to_string()))?;
            if !r.curve.is_empty() {
                r.curve.parse::<est_proto::ca::Curve>().map_err(bad)?;
            }
        }
        Ok(())
    }

    /// The rules for the policy (call after [`DlmsSection::validate`]; invalid ones are
    /// left out).
    pub fn rules(&self) -> Vec<est_proto::dlms::DlmsRule> {
        self.rules
            .iter()
            .filter_map(|r| {
                Some(est_proto::dlms::DlmsRule {
                    serial_prefix: r.serial_prefix.clone(),
                    flag_id: est_proto::dlms::parse_flag_id(&r.flag_id).ok()?,
                    curve: if r.curve.is_empty() {
                        None
                    } else {
                        Some(r.curve.parse().ok()?)
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn rules_parse_and_bad_ones_are_refused() {
        let ok = "[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"ABC\"\n";
        let cfg = Config::parse(ok, Path::new("t")).unwrap();
        assert_eq!(cfg.policy_config().dlms_rules.len(), 1);
        for bad in [
            "[[dlms.rules]]\nserial_prefix = \"\"\nflag_id = \"ABC\"\n",
            "[[dlms.rules]]\nserial_prefix = \"A B\"\nflag_id = \"ABC\"\n",
            "[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"AB\"\n",
            "[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"abc\"\n",
            "[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"ABC\"\ncurve = \"P-521\"\n",
            "[[dlms.rules]]\nserial_prefix = \"ABC\"\nflag_id = \"ABC\"\nother = 1\n",
        ] {
            assert!(Config::parse(bad, Path::new("t")).is_err(), "{bad}");
        }
    }
}
