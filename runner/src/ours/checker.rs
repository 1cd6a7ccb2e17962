//! The driver checker's findings in a run against our device (issue #9 item 3): the server's
//! `checker:` and `device saw:` lines, the firmware's `checker-expect:` announcements, and the
//! comparison of the two.
//!
//! The server (`virtio-iommu-vfio-user --checker`) prints at exit one
//! `checker: <statement> <count> <first offending request as hex> (<why>)` line per driver
//! statement broken (`R6`, `I1`, … as `virtio_iommu_device::Statement` names them), or
//! `checker: no violations`, then `device saw: ATTACH a DETACH d MAP m UNMAP u PROBE p faults f`.
//!
//! The firmware breaks some statements on purpose (conformance cases and error cases that
//! test what the device does with a bad request) and announces each beforehand or after the
//! case ran as `checker-expect: <statement> <who>` (`<who>` a case ID, no spaces), with
//! ` not-run` appended when the case did not run to its end. A recorded statement no
//! announcement names is a driver bug of the firmware ([`unannounced`], a failure); an
//! statement announced by more cases that ran than the checker counted breaches of is a
//! checker gap ([`gaps`], a warning: whether a deliberate request breaks a statement can depend
//! on the features negotiated). An accidental breach of a statement some case also breaks on
//! purpose is not told apart at this level (the in-process `tests/tests/checker_declared.rs`
//! attributes the suite's breaches case by case).

#[allow(unused_imports)]
use crate::*;

/// The prefix of the server's checker lines.
pub const CHECKER_PREFIX: &str = "checker: ";
/// The prefix of the server's "what the device saw" line.
pub const SAW_PREFIX: &str = "device saw: ";
/// The prefix of the firmware's announcements.
pub const EXPECT_PREFIX: &str = "checker-expect: ";

/// One statement the checker found broken.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CheckerViolation {
    /// The statement's code: `R6`, `V1`, `I3`, ….
    pub statement: String,
    /// How many requests (or config writes, notifications, buffers) broke it.
    pub count: u64,
    /// The whole line as the server printed it (with the first offender's bytes and why).
    pub line: String,
}

/// What the server's checker printed.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CheckerFindings {
    /// Its `checker:` lines, in order, trimmed.
    pub lines: Vec<String>,
    /// The violations (empty for `checker: no violations`).
    pub violations: Vec<CheckerViolation>,
}

/// The checker's findings in the server's stdout: `None` when it printed no `checker:` line
/// (checker off) or `checker: off`. Lines that do not parse as `<statement> <count> …` are kept
/// in [`CheckerFindings::lines`] and count as a violation of statement `?` (so they are not
/// lost).
pub fn parse_checker(stdout: &str) -> Option<CheckerFindings> {
    let lines: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(CHECKER_PREFIX))
        .map(String::from)
        .collect();
    if lines.is_empty() || lines.iter().any(|l| l == "checker: off") {
        return None;
    }
    let violations = lines
        .iter()
        .filter(|l| l.as_str() != "checker: no violations")
        .map(|line| {
            let rest = line.strip_prefix(CHECKER_PREFIX).unwrap_or(line);
            let mut words = rest.split_whitespace();
            let (statement, count) = match (words.next(), words.next().map(str::parse::<u64>)) {
                (Some(s), Some(Ok(n))) => (s.to_string(), n),
                _ => ("?".to_string(), 0),
            };
            CheckerViolation {
                statement,
                count,
                line: line.clone(),
            }
        })
        .collect();
    Some(CheckerFindings { lines, violations })
}

/// The server's last `device saw: …` line, trimmed.
pub fn parse_saw(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(SAW_PREFIX))
        .map(String::from)
        .next_back()
}

/// One `checker-expect: <statement> <who>[ not-run]` line of the firmware.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CheckerExpect {
    /// The statement broken on purpose (`R6`, …).
    pub statement: String,
    /// Which case breaks it.
    pub who: String,
    /// Whether the case ran to its end (no ` not-run`): only then is the statement expected to
    /// be recorded.
    pub ran: bool,
}

/// Every announcement in the firmware's output, in order.
pub fn parse_expects(output: &str) -> Vec<CheckerExpect> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix(EXPECT_PREFIX)?;
            let mut words = rest.split_whitespace();
            let statement = words.next()?.to_string();
            let who = words.next()?.to_string();
            let ran = words.next() != Some("not-run");
            Some(CheckerExpect {
                statement,
                who,
                ran,
            })
        })
        .collect()
}

/// The violations no announcement in `output` names (the firmware broke a statement by
/// accident): one message each, with the server's line. Empty when the run had no checker.
pub fn unannounced(findings: Option<&CheckerFindings>, output: &str) -> Vec<String> {
    let Some(findings) = findings else {
        return Vec::new();
    };
    let expects = parse_expects(output);
    findings
        .violations
        .iter()
        .filter(|v| !expects.iter().any(|e| e.statement == v.statement))
        .map(|v| {
            format!(
                "driver checker: {} broken, not announced by the guest: {}",
                v.statement, v.line
            )
        })
        .collect()
}

/// The statements announced by more cases that ran than the checker counted breaches of
/// (each such case breaks its statement at least once, so a count below the number of its
/// announcers means a case did not: a gap of the checker, or a case that no longer breaks
/// what it says): one message per statement, naming the cases. Cases announcing the same
/// statement twice count once. Empty when the run had no checker.
pub fn gaps(findings: Option<&CheckerFindings>, output: &str) -> Vec<String> {
    let Some(findings) = findings else {
        return Vec::new();
    };
    let mut announcers: Vec<(String, Vec<String>)> = Vec::new();
    for e in parse_expects(output).into_iter().filter(|e| e.ran) {
        match announcers.iter_mut().find(|(s, _)| *s == e.statement) {
            Some((_, who)) if who.contains(&e.who) => {}
            Some((_, who)) => who.push(e.who),
            None => announcers.push((e.statement, vec![e.who])),
        }
    }
    announcers
        .into_iter()
        .filter_map(|(s, who)| {
            let count = findings
                .violations
                .iter()
                .find(|v| v.statement == s)
                .map_or(0, |v| v.count);
            (count < who.len() as u64).then(|| {
                format!(
                    "checker gap: {s} recorded {count} time(s), announced by {} case(s) that ran: {}",
                    who.len(),
                    who.join(", ")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "virtio-iommu-vfio-user: listening\n\
        checker: R6 2 03010000 01000000 (req_head.reserved = 01 00 00)\n\
        checker: I1 5 7f000000 (undefined request type 127)\n\
        device saw: ATTACH 3 DETACH 1 MAP 4 UNMAP 4 PROBE 2 faults 1\n\
        virtio-iommu-vfio-user: requests=20 notifications=20 faults=1\n";

    #[test]
    fn server_lines() {
        let f = parse_checker(SERVER).unwrap();
        assert_eq!(f.lines.len(), 2);
        assert_eq!(
            f.violations
                .iter()
                .map(|v| (v.statement.as_str(), v.count))
                .collect::<Vec<_>>(),
            [("R6", 2), ("I1", 5)]
        );
        assert!(f.violations[1]
            .line
            .ends_with("(undefined request type 127)"));
        assert_eq!(
            parse_saw(SERVER).as_deref(),
            Some("device saw: ATTACH 3 DETACH 1 MAP 4 UNMAP 4 PROBE 2 faults 1")
        );
        let clean = parse_checker("checker: no violations\n").unwrap();
        assert!(clean.violations.is_empty() && clean.lines.len() == 1);
        assert_eq!(parse_checker("checker: off\n"), None);
        assert_eq!(parse_checker("virtio-iommu-vfio-user: listening\n"), None);
        assert_eq!(parse_saw(""), None);
        // A line that does not parse still counts.
        let odd = parse_checker("checker: what\n").unwrap();
        assert_eq!(odd.violations[0].statement, "?");
    }

    #[test]
    fn announced_unannounced_and_gaps() {
        let f = parse_checker(SERVER);
        let fw = "ok 1 - x\ncheckers-expect: R5 nope\nchecker-expect: R6 req-head-reserved\n\
                  checker-expect: R10 attach-reserved not-run\n\
                  checker-expect: R13 detach-reserved\nchecker-expect: R13 errors:detach\n";
        assert_eq!(
            parse_expects(fw),
            [
                CheckerExpect {
                    statement: "R6".into(),
                    who: "req-head-reserved".into(),
                    ran: true
                },
                CheckerExpect {
                    statement: "R10".into(),
                    who: "attach-reserved".into(),
                    ran: false
                },
                CheckerExpect {
                    statement: "R13".into(),
                    who: "detach-reserved".into(),
                    ran: true
                },
                CheckerExpect {
                    statement: "R13".into(),
                    who: "errors:detach".into(),
                    ran: true
                },
            ]
        );
        let u = unannounced(f.as_ref(), fw);
        assert_eq!(u.len(), 1, "{u:?}");
        assert!(
            u[0].contains("I1 broken, not announced") && u[0].contains("undefined request type")
        );
        // R10's case did not run: no gap; R13 was announced by two cases, one message.
        assert_eq!(
            gaps(f.as_ref(), fw),
            [
                "checker gap: R13 recorded 0 time(s), announced by 2 case(s) that ran: \
                 detach-reserved, errors:detach"
            ]
        );
        // R6 recorded twice: two announcing cases are fine, three are not (one did not break
        // it); the same case announcing thrice counts once.
        let thrice = "checker-expect: R6 a\nchecker-expect: R6 a\nchecker-expect: R6 a\n";
        assert!(gaps(f.as_ref(), thrice).is_empty());
        let three = "checker-expect: R6 a\nchecker-expect: R6 b\nchecker-expect: R6 c\n";
        assert_eq!(gaps(f.as_ref(), three).len(), 1);
        // I1 recorded 5 times covers up to 5 announcing cases.
        let five: String = (0..5)
            .map(|i| format!("checker-expect: I1 c{i}\n"))
            .collect();
        assert!(gaps(f.as_ref(), &five).is_empty());
        // Without a checker, nothing to compare.
        assert!(unannounced(None, fw).is_empty() && gaps(None, fw).is_empty());
        assert!(unannounced(parse_checker("checker: no violations").as_ref(), "").is_empty());
    }
}
