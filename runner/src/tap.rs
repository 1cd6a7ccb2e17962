//! Reading a run's console: TAP lines and plan, the firmware's summary and `disk-sha256`
//! lines, and the pass criteria ([`problems`]).

#[allow(unused_imports)]
use crate::*;

/// One TAP test line: `ok 3 - name # directive` or `not ok 4 - name`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TapLine {
    /// `ok` (true) or `not ok` (false).
    pub ok: bool,
    /// The test number.
    pub number: u32,
    /// The description (without a leading `- ` and without the directive).
    pub name: String,
    /// The text after ` # `, if any (e.g. `SKIP reason`).
    pub directive: Option<String>,
}

/// Parses one line as a TAP test line.
pub(crate) fn parse_tap_line(line: &str) -> Option<TapLine> {
    let line = line.trim_end();
    let (ok, rest) = if let Some(rest) = line.strip_prefix("ok ") {
        (true, rest)
    } else {
        (false, line.strip_prefix("not ok ")?)
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = rest[..digits].parse().ok()?;
    let rest = rest[digits..].trim_start();
    let rest = rest.strip_prefix("- ").unwrap_or(rest);
    let (name, directive) = match rest.split_once(" # ") {
        Some((name, directive)) => (name, Some(directive.trim().to_string())),
        None => match rest.strip_prefix("# ") {
            Some(directive) => ("", Some(directive.trim().to_string())),
            None => (rest, None),
        },
    };
    Some(TapLine {
        ok,
        number,
        name: name.trim().to_string(),
        directive,
    })
}

/// Every TAP test line (`ok N ...` / `not ok N ...`) in the output, in order.
pub fn parse_tap(output: &str) -> Vec<TapLine> {
    output.lines().filter_map(parse_tap_line).collect()
}

/// The TAP plan (`1..N`), if the output has one (the last one wins).
pub fn tap_plan(output: &str) -> Option<u32> {
    output
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("1.."))
        .filter_map(|n| n.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// The firmware's `firmware: N passed, M failed` line (the last one) as `(N, M)`.
pub fn summary(output: &str) -> Option<(u32, u32)> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("firmware: ")?;
            let (passed, failed) = rest.split_once(" passed, ")?;
            let failed = failed.strip_suffix(" failed")?;
            Some((passed.parse().ok()?, failed.parse().ok()?))
        })
        .next_back()
}

/// The SHA-256 the firmware reported for the disk (`disk-sha256: <64 hex>`, last one),
/// lowercase.
pub fn reported_disk_sha256(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| {
            let hex = line.trim().strip_prefix("disk-sha256:")?.trim();
            (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| hex.to_ascii_lowercase())
        })
        .next_back()
}

/// Everything wrong with a run, by the project's pass criteria: exit status 0; a summary line
/// with N > 0 passed and 0 failed; no `not ok`; every TAP number 1..=plan present (plan from
/// the `1..N` line, else passed + failed); and, if `check_disk_sha256`, the firmware's
/// `disk-sha256` equal to the host's; against our device, a server that exited by itself with
/// status 0 and printed its counts ([`ServerReport::problems`]), and whose driver checker
/// recorded no statement the firmware did not announce ([`ours::checker::unannounced`]; checker
/// gaps, [`ours::checker::gaps`], are not problems). Empty when the run passed.
pub fn problems(outcome: &RunOutcome, check_disk_sha256: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if outcome.exit_code != 0 {
        problems.push(format!("exit status {} (expected 0)", outcome.exit_code));
    }
    let summary = summary(&outcome.output);
    match summary {
        None => problems.push("no `firmware: N passed, M failed` line".into()),
        Some((passed, failed)) => {
            if passed == 0 {
                problems.push("no case passed".into());
            }
            if failed != 0 {
                problems.push(format!("{failed} case(s) failed"));
            }
        }
    }
    let tap = parse_tap(&outcome.output);
    for line in tap.iter().filter(|l| !l.ok) {
        problems.push(format!("not ok {} - {}", line.number, line.name));
    }
    let expected = tap_plan(&outcome.output).or_else(|| summary.map(|(p, f)| p + f));
    match expected {
        None => problems.push("no TAP plan".into()),
        Some(n) => {
            let missing: Vec<u32> = (1..=n)
                .filter(|i| !tap.iter().any(|l| l.number == *i))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("TAP numbers missing from 1..={n}: {missing:?}"));
            }
        }
    }
    if check_disk_sha256 {
        match reported_disk_sha256(&outcome.output) {
            None => problems.push("firmware reported no disk-sha256".into()),
            Some(reported) if reported != outcome.disk_sha256 => problems.push(format!(
                "disk-sha256 mismatch: firmware {reported}, host {}",
                outcome.disk_sha256
            )),
            Some(_) => {}
        }
    }
    if let Some(server) = &outcome.server {
        problems.extend(server.problems());
        problems.extend(crate::ours::checker::unannounced(
            server.checker.as_ref(),
            &outcome.output,
        ));
    }
    problems
}
