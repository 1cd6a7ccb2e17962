//! The text form of a [`FaultPlan`] (grammar in the parent module's documentation):
//! `Display` for [`FaultPlan`], [`Misbehaviour`] and [`When`], `FromStr` for [`FaultPlan`].

use std::fmt;
use std::str::FromStr;

use virtio_iommu_driver::wire::RequestType;

use super::{Fault, FaultPlan, Misbehaviour, When};

/// Why a text plan could not be read: the offending fault's text and what is wrong with it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ParsePlanError {
    /// The fault (between `;`) that could not be read.
    pub fault: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl fmt::Display for ParsePlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fault `{}`: {}", self.fault, self.reason)
    }
}

impl std::error::Error for ParsePlanError {}

const TYPES: [(RequestType, &str); 5] = [
    (RequestType::Attach, "attach"),
    (RequestType::Detach, "detach"),
    (RequestType::Map, "map"),
    (RequestType::Unmap, "unmap"),
    (RequestType::Probe, "probe"),
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn int(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConfigGenerationUnstable => write!(f, "config-generation-unstable"),
            Self::FeaturesChangeAfterFeaturesOk { offered } => {
                write!(f, "features-after-ok({offered:#x})")
            }
            Self::FeaturesOkRefused => write!(f, "features-ok-refused"),
            Self::StatusAfterReset(v) => write!(f, "status-after-reset({v})"),
            Self::QueueNumMax(n) => write!(f, "queue-num-max({n})"),
            Self::ConfigBytes { offset, bytes } => {
                write!(f, "config-bytes({offset}, {})", hex(bytes))
            }
            Self::UsedLen(n) => write!(f, "used-len({n})"),
            Self::Status(s) => write!(f, "status({s})"),
            Self::TailNotWritten => write!(f, "tail-not-written"),
            Self::NeverComplete => write!(f, "never-complete"),
            Self::NeedsReset => write!(f, "needs-reset"),
            Self::ResetSelf => write!(f, "reset-self"),
            Self::UsedIdOutOfRange => write!(f, "used-id-out-of-range"),
            Self::UsedTwice => write!(f, "used-twice"),
            Self::Reorder => write!(f, "reorder"),
            Self::ProbeOverlap => write!(f, "probe-overlap"),
            Self::ProbeOverrun => write!(f, "probe-overrun"),
            Self::ProbeReservedBits => write!(f, "probe-reserved-bits"),
            Self::ProbeProperties(b) => write!(f, "probe-properties({})", hex(b)),
            Self::EventUsedLen(n) => write!(f, "event-used-len({n})"),
            Self::EventFlood { used_len } => write!(f, "event-flood({used_len})"),
        }
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = self.request {
            let name = TYPES.iter().find(|(r, _)| *r == t).map_or("?", |(_, n)| *n);
            write!(f, "{name}")?;
        }
        if self.after != 0 {
            write!(f, "+{}", self.after)?;
        }
        if let Some(t) = self.times {
            write!(f, "*{t}")?;
        }
        Ok(())
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fault) in self.faults.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}", fault.what)?;
            if fault.when != When::ALWAYS {
                write!(f, "@{}", fault.when)?;
            }
        }
        Ok(())
    }
}

fn parse_when(s: &str) -> Result<When, &'static str> {
    let s = s.trim();
    let (rest, times) = match s.split_once('*') {
        Some((r, t)) => (r, Some(int(t).ok_or("`*` needs a count")?)),
        None => (s, None),
    };
    let (name, after) = match rest.split_once('+') {
        Some((n, a)) => (n, int(a).ok_or("`+` needs a count")?),
        None => (rest, 0),
    };
    let name = name.trim();
    let request = if name.is_empty() {
        None
    } else {
        Some(
            TYPES
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(t, _)| *t)
                .ok_or("unknown request type")?,
        )
    };
    Ok(When {
        after,
        times,
        request,
    })
}

fn parse_misbehaviour(s: &str) -> Result<Misbehaviour, &'static str> {
    let s = s.trim();
    let (name, args) = match s.split_once('(') {
        Some((n, a)) => (
            n.trim(),
            Some(a.strip_suffix(')').ok_or("missing `)`")?.trim()),
        ),
        None => (s, None),
    };
    let num = |max: u64| -> Result<u64, &'static str> {
        let v = int(args.ok_or("missing argument")?).ok_or("bad number")?;
        if v > max {
            return Err("number too large");
        }
        Ok(v)
    };
    let none = |m: Misbehaviour| match args {
        None => Ok(m),
        Some(_) => Err("takes no argument"),
    };
    Ok(match name {
        "config-generation-unstable" => none(Misbehaviour::ConfigGenerationUnstable)?,
        "features-after-ok" => Misbehaviour::FeaturesChangeAfterFeaturesOk {
            offered: num(u64::MAX)?,
        },
        "features-ok-refused" => none(Misbehaviour::FeaturesOkRefused)?,
        "status-after-reset" => Misbehaviour::StatusAfterReset(num(0xff)? as u8),
        "queue-num-max" => Misbehaviour::QueueNumMax(num(u64::from(u32::MAX))? as u32),
        "config-bytes" => {
            let (o, b) = args
                .ok_or("missing arguments")?
                .split_once(',')
                .ok_or("needs `offset, hexbytes`")?;
            let offset = int(o).filter(|&v| v <= 0xff).ok_or("bad offset")? as u8;
            Misbehaviour::ConfigBytes {
                offset,
                bytes: unhex(b.trim()).ok_or("bad hex bytes")?,
            }
        }
        "used-len" => Misbehaviour::UsedLen(num(u64::from(u32::MAX))? as u32),
        "status" => Misbehaviour::Status(num(0xff)? as u8),
        "tail-not-written" => none(Misbehaviour::TailNotWritten)?,
        "never-complete" => none(Misbehaviour::NeverComplete)?,
        "needs-reset" => none(Misbehaviour::NeedsReset)?,
        "reset-self" => none(Misbehaviour::ResetSelf)?,
        "used-id-out-of-range" => none(Misbehaviour::UsedIdOutOfRange)?,
        "used-twice" => none(Misbehaviour::UsedTwice)?,
        "reorder" => none(Misbehaviour::Reorder)?,
        "probe-overlap" => none(Misbehaviour::ProbeOverlap)?,
        "probe-overrun" => none(Misbehaviour::ProbeOverrun)?,
        "probe-reserved-bits" => none(Misbehaviour::ProbeReservedBits)?,
        "probe-properties" => Misbehaviour::ProbeProperties(
            unhex(args.ok_or("missing argument")?).ok_or("bad hex bytes")?,
        ),
        "event-used-len" => Misbehaviour::EventUsedLen(num(u64::from(u32::MAX))? as u32),
        "event-flood" => Misbehaviour::EventFlood {
            used_len: num(u64::from(u32::MAX))? as u32,
        },
        _ => return Err("unknown misbehaviour"),
    })
}

impl FromStr for FaultPlan {
    type Err = ParsePlanError;

    /// Reads the text form (see the module documentation).
    ///
    /// # Errors
    ///
    /// [`ParsePlanError`] naming the first fault that cannot be read (unknown name or
    /// request type, missing or extra argument, bad number or hex, number out of range).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut plan = FaultPlan::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let err = |reason| ParsePlanError {
                fault: part.to_string(),
                reason,
            };
            let (what, when) = match part.rsplit_once('@') {
                Some((w, c)) => (w, parse_when(c).map_err(err)?),
                None => (part, When::ALWAYS),
            };
            plan.faults.push(Fault {
                what: parse_misbehaviour(what).map_err(err)?,
                when,
            });
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_misbehaviour() -> Vec<Misbehaviour> {
        vec![
            Misbehaviour::ConfigGenerationUnstable,
            Misbehaviour::FeaturesChangeAfterFeaturesOk {
                offered: 0x1_0000_0004,
            },
            Misbehaviour::FeaturesOkRefused,
            Misbehaviour::StatusAfterReset(3),
            Misbehaviour::QueueNumMax(16),
            Misbehaviour::ConfigBytes {
                offset: 36,
                bytes: vec![2, 0xff],
            },
            Misbehaviour::UsedLen(0),
            Misbehaviour::Status(9),
            Misbehaviour::TailNotWritten,
            Misbehaviour::NeverComplete,
            Misbehaviour::NeedsReset,
            Misbehaviour::ResetSelf,
            Misbehaviour::UsedIdOutOfRange,
            Misbehaviour::UsedTwice,
            Misbehaviour::Reorder,
            Misbehaviour::ProbeOverlap,
            Misbehaviour::ProbeOverrun,
            Misbehaviour::ProbeReservedBits,
            Misbehaviour::ProbeProperties(vec![1, 0, 0x14, 0]),
            Misbehaviour::EventUsedLen(3),
            Misbehaviour::EventFlood { used_len: 24 },
        ]
    }

    #[test]
    fn every_misbehaviour_round_trips() {
        let whens = [
            When::ALWAYS,
            When::nth(3).on(RequestType::Map),
            When::after(2),
            When::ALWAYS.times(5).on(RequestType::Probe),
        ];
        let mut plan = FaultPlan::new();
        for (i, m) in every_misbehaviour().into_iter().enumerate() {
            plan = plan.with(m, whens[i % whens.len()]);
        }
        let text = plan.to_string();
        assert_eq!(text.parse::<FaultPlan>(), Ok(plan), "{text}");
        assert_eq!("".parse::<FaultPlan>(), Ok(FaultPlan::new()));
    }

    #[test]
    fn examples_and_errors() {
        let plan: FaultPlan = " never-complete @ map+2*1 ; used-len(0x10)@probe;reorder"
            .parse()
            .unwrap();
        assert_eq!(
            plan,
            FaultPlan::new()
                .with(
                    Misbehaviour::NeverComplete,
                    When::nth(3).on(RequestType::Map)
                )
                .with(
                    Misbehaviour::UsedLen(16),
                    When::ALWAYS.on(RequestType::Probe)
                )
                .always(Misbehaviour::Reorder)
        );
        assert_eq!(
            plan.to_string(),
            "never-complete@map+2*1; used-len(16)@probe; reorder"
        );
        for (bad, reason) in [
            ("explode", "unknown misbehaviour"),
            ("status(256)", "number too large"),
            ("status", "missing argument"),
            ("reorder(1)", "takes no argument"),
            ("used-len(1", "missing `)`"),
            ("never-complete@read", "unknown request type"),
            ("never-complete@map*x", "`*` needs a count"),
            ("config-bytes(300, 00)", "bad offset"),
            ("probe-properties(0)", "bad hex bytes"),
        ] {
            assert_eq!(
                bad.parse::<FaultPlan>().map_err(|e| e.reason),
                Err(reason),
                "{bad}"
            );
        }
    }
}
