//! Model prices, in microcents per token, for cost accounting and budget checks.

/// Microcents per prompt token and per completion token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    /// Per prompt token.
    pub input: u64,
    /// Per completion token.
    pub output: u64,
}

/// The price of unknown models: high on purpose, so that a missing entry overstates cost rather
/// than letting a run exceed its ceiling unnoticed.
pub const UNKNOWN: Price = Price {
    input: 1_500,
    output: 7_500,
};

/// Known prices ($ per million tokens × 100 = microcents per token). The longest matching prefix wins.
/// The model name is the tenant's to choose (its LLM settings), so nothing in this table is free:
/// a free prefix ("llama" for self-hosted models, say) would let any tenant spend the deployment's
/// paid endpoint without a cost ceiling binding. Only the rules planner, which calls no model, is
/// free, by its provider ([`cost`]).
const TABLE: &[(&str, Price)] = &[
    (
        "gpt-4o-mini",
        Price {
            input: 15,
            output: 60,
        },
    ),
    (
        "gpt-4o",
        Price {
            input: 250,
            output: 1_000,
        },
    ),
    (
        "gpt-4.1-mini",
        Price {
            input: 40,
            output: 160,
        },
    ),
    (
        "gpt-4.1",
        Price {
            input: 200,
            output: 800,
        },
    ),
    (
        "claude-3-5-haiku",
        Price {
            input: 80,
            output: 400,
        },
    ),
    (
        "claude-3-haiku",
        Price {
            input: 25,
            output: 125,
        },
    ),
    (
        "claude-sonnet",
        Price {
            input: 300,
            output: 1_500,
        },
    ),
    (
        "claude-3-5-sonnet",
        Price {
            input: 300,
            output: 1_500,
        },
    ),
    (
        "claude-opus",
        Price {
            input: 1_500,
            output: 7_500,
        },
    ),
];

/// The price of `model`.
pub fn price(model: &str) -> Price {
    TABLE
        .iter()
        .filter(|(prefix, _)| model.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or(UNKNOWN, |(_, p)| *p)
}

/// The provider of the rules planner, the only one whose calls cost nothing.
pub const RULES_PROVIDER: &str = "rules";

/// The cost of a call to `provider`'s `model`, in microcents: nothing for the rules planner,
/// which calls no model; otherwise by [`price`].
pub fn cost(provider: &str, model: &str, tokens_in: u64, tokens_out: u64) -> u64 {
    if provider == RULES_PROVIDER {
        return 0;
    }
    let p = price(model);
    tokens_in
        .saturating_mul(p.input)
        .saturating_add(tokens_out.saturating_mul(p.output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_and_unknown_models_are_dear() {
        assert_eq!(
            price("gpt-4o-mini-2024-07-18"),
            Price {
                input: 15,
                output: 60
            }
        );
        assert_eq!(
            price("gpt-4o-2024-08-06"),
            Price {
                input: 250,
                output: 1_000
            }
        );
        assert_eq!(price("mystery-model"), UNKNOWN);
        assert_eq!(cost("openai", "gpt-4o-mini", 1000, 100), 15_000 + 6_000);
        assert_eq!(cost(RULES_PROVIDER, "rules-v1", 1000, 1000), 0);
        // A tenant names its model: no name is free on a provider that bills.
        for model in ["rules-v1", "llama-3.3-70b-versatile", "llama3"] {
            assert_eq!(price(model), UNKNOWN, "{model}");
            assert_eq!(cost("openai", model, 1, 0), UNKNOWN.input, "{model}");
        }
    }
}
