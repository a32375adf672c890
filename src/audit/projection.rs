//! Projections derived from a tenant's events: memberships, installation states, monthly usage and
//! run states. Folding the log from the start rebuilds them; `audit replay` compares the result with
//! the live ones.

use std::collections::BTreeMap;

use serde_json::Value;

/// Usage in one calendar month (UTC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Runs started.
    pub runs: u64,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// Tool calls made.
    pub tool_calls: u64,
    /// Cost in microcents.
    pub cost_microcents: u64,
}

impl Usage {
    /// Adds `other` into `self`, saturating rather than wrapping.
    pub fn add(&mut self, other: &Usage) {
        self.runs = self.runs.saturating_add(other.runs);
        self.tokens_in = self.tokens_in.saturating_add(other.tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(other.tokens_out);
        self.tool_calls = self.tool_calls.saturating_add(other.tool_calls);
        self.cost_microcents = self.cost_microcents.saturating_add(other.cost_microcents);
    }
}

/// The usage deltas of one fold of events, by month, each with its event's sequence number.
///
/// A store adds to a month's total only the deltas of events its record has not taken in yet
/// (`from` in [`UsageDeltas::since`]), so that folding the same events again after a crash, in one
/// range or another, counts each event once; see `store::ProjectionRepo::apply_projection`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageDeltas(BTreeMap<String, Vec<(u64, Usage)>>);

impl UsageDeltas {
    /// Records the usage of event `seq`, in `month`; events come in sequence order.
    pub fn push(&mut self, month: &str, seq: u64, delta: Usage) {
        match self.0.get_mut(month) {
            Some(v) => v.push((seq, delta)),
            None => {
                self.0.insert(month.to_owned(), vec![(seq, delta)]);
            }
        }
    }

    /// The months with usage.
    pub fn months(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The sum of `month`'s deltas from events `from` and later.
    pub fn since(&self, month: &str, from: u64) -> Usage {
        let mut total = Usage::default();
        for (_, d) in self
            .0
            .get(month)
            .into_iter()
            .flatten()
            .filter(|(seq, _)| *seq >= from)
        {
            total.add(d);
        }
        total
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Started, not finished.
    Running,
    /// Finished with an answer.
    Completed,
    /// Stopped without an answer (a budget stop among the reasons).
    Failed,
}

/// The month key (`YYYY-MM`) of an event's time.
pub fn month_of(time: &str) -> &str {
    time.get(..7).unwrap_or("")
}

/// What the usage and run projections read of one event: its type and its usage fields (0 when
/// absent or not a whole number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The event type.
    pub ty: &'a str,
    /// `data.tokens_in`.
    pub tokens_in: u64,
    /// `data.tokens_out`.
    pub tokens_out: u64,
    /// `data.cost_microcents`.
    pub cost_microcents: u64,
}

impl<'a> Facts<'a> {
    /// The facts of an event, or `None` when it has no type.
    pub fn of(event: &'a Value) -> Option<Facts<'a>> {
        let d = &event["data"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Some(Facts {
            ty: event["type"].as_str()?,
            tokens_in: n(&d["tokens_in"]),
            tokens_out: n(&d["tokens_out"]),
            cost_microcents: n(&d["cost_microcents"]),
        })
    }
}

/// What one event adds to a month's usage, if anything.
pub fn usage_delta(event: &Value) -> Option<Usage> {
    usage_of(&Facts::of(event)?)
}

/// What an event with these facts adds to a month's usage, if anything.
pub fn usage_of(f: &Facts<'_>) -> Option<Usage> {
    match f.ty {
        "run.started" => Some(Usage {
            runs: 1,
            ..Usage::default()
        }),
        "model.called" => Some(Usage {
            tokens_in: f.tokens_in,
            tokens_out: f.tokens_out,
            cost_microcents: f.cost_microcents,
            ..Usage::default()
        }),
        "tool.invoked" => Some(Usage {
            tool_calls: 1,
            cost_microcents: f.cost_microcents,
            ..Usage::default()
        }),
        _ => None,
    }
}

/// The run state an event moves its run to, if any.
pub fn run_transition(event: &Value) -> Option<RunState> {
    transition_of(event["type"].as_str()?)
}

/// The run state an event of type `ty` moves its run to, if any.
pub fn transition_of(ty: &str) -> Option<RunState> {
    match ty {
        "run.started" => Some(RunState::Running),
        "run.completed" => Some(RunState::Completed),
        "run.failed" => Some(RunState::Failed),
        _ => None,
    }
}

/// Every projection of one tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Projections {
    /// Principal to role.
    pub members: BTreeMap<String, String>,
    /// Installation id to `active` or `revoked`.
    pub installations: BTreeMap<String, String>,
    /// Month (`YYYY-MM`) to usage.
    pub usage: BTreeMap<String, Usage>,
    /// Run id to state.
    pub runs: BTreeMap<String, RunState>,
}

impl Projections {
    /// Folds one event in.
    pub fn apply(&mut self, event: &Value) {
        let d = &event["data"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        match event["type"].as_str().unwrap_or_default() {
            "role.granted" => {
                self.members.insert(s(&d["principal"]), s(&d["role"]));
            }
            "role.revoked" => {
                self.members
                    .remove(d["principal"].as_str().unwrap_or_default());
            }
            "installation.created" => {
                self.installations
                    .insert(s(&d["installation_id"]), "active".into());
            }
            "installation.updated" => {
                let reactivated = d["changed"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|f| f == "status"));
                if reactivated {
                    self.installations
                        .insert(s(&d["installation_id"]), "active".into());
                }
            }
            "installation.revoked" => {
                self.installations
                    .insert(s(&d["installation_id"]), "revoked".into());
            }
            _ => {}
        }
        if let Some(delta) = usage_delta(event) {
            let month = month_of(event["time"].as_str().unwrap_or_default()).to_owned();
            self.usage.entry(month).or_default().add(&delta);
        }
        if let Some(state) = run_transition(event) {
            self.runs.insert(s(&event["run_id"]), state);
        }
    }

    /// Every difference between `self` (rebuilt from the log) and `live`, one line each.
    pub fn diff(&self, live: &Projections) -> Vec<String> {
        let mut out = Vec::new();
        diff_map("membership", &self.members, &live.members, &mut out);
        diff_map(
            "installation",
            &self.installations,
            &live.installations,
            &mut out,
        );
        diff_map("usage", &self.usage, &live.usage, &mut out);
        diff_map("run", &self.runs, &live.runs, &mut out);
        out
    }
}

fn diff_map<V: PartialEq + std::fmt::Debug>(
    what: &str,
    replayed: &BTreeMap<String, V>,
    live: &BTreeMap<String, V>,
    out: &mut Vec<String>,
) {
    for (k, v) in replayed {
        match live.get(k) {
            None => out.push(format!("{what} {k}: the log says {v:?}, live has nothing")),
            Some(l) if l != v => {
                out.push(format!("{what} {k}: the log says {v:?}, live has {l:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, l) in live {
        if !replayed.contains_key(k) {
            out.push(format!("{what} {k}: live has {l:?}, the log says nothing"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folds_events_and_reports_differences() {
        let mut p = Projections::default();
        let ev = |ty: &str, data: Value| json!({"type": ty, "data": data, "time": "2026-11-22T10:00:00.000000Z", "run_id": "R1"});
        p.apply(&ev(
            "role.granted",
            json!({"principal": "slack:U1", "role": "owner"}),
        ));
        p.apply(&ev(
            "installation.created",
            json!({"installation_id": "i_1"}),
        ));
        p.apply(&ev("run.started", json!({})));
        p.apply(&ev(
            "model.called",
            json!({"tokens_in": 10, "tokens_out": 5, "cost_microcents": 7}),
        ));
        p.apply(&ev("tool.invoked", json!({"cost_microcents": 3})));
        p.apply(&ev("run.completed", json!({})));
        p.apply(&ev(
            "installation.revoked",
            json!({"installation_id": "i_1"}),
        ));
        assert_eq!(p.members["slack:U1"], "owner");
        assert_eq!(p.installations["i_1"], "revoked");
        assert_eq!(
            p.usage["2026-11"],
            Usage {
                runs: 1,
                tokens_in: 10,
                tokens_out: 5,
                tool_calls: 1,
                cost_microcents: 10
            }
        );
        assert_eq!(p.runs["R1"], RunState::Completed);
        assert!(p.diff(&p.clone()).is_empty());
        let mut live = p.clone();
        live.members.insert("slack:U2".into(), "admin".into());
        live.usage.get_mut("2026-11").unwrap().tool_calls = 2;
        let d = p.diff(&live);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].contains("slack:U2") && d[1].contains("usage 2026-11"),
            "{d:?}"
        );
    }
}
