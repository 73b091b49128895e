//! What to select and how: the method (ID3, PaFI, BitFit), the budget, the parameters trained
//! fully, and the `verify` switch.

use burn::module::ParamGroup;

use crate::error::{Result, SelectiveError};

/// Incremental unmasking with the D3 metric (ID3, "Step-by-Step Unmasking for PEFT of LLMs").
#[derive(Clone, Debug, PartialEq)]
pub struct Id3Config {
    /// Number of steps over which the budget is unmasked (`T`); the whole budget is chosen after
    /// `max_steps` steps and nothing more afterwards.
    pub max_steps: usize,
    /// `eps` of `D3 = |g| / (eps + |θ|)^exp` (default `1e-8`, as in the toolkit).
    pub eps: f64,
    /// `exp` of `D3 = |g| / (eps + |θ|)^exp` (default `1.0`; `0.0` gives `|g|`).
    pub exp: f64,
}

/// Which entries a selective optimizer trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// ID3: unmask `u(t) = B_eff / T + [t < B_eff % T]` entries of highest D3 at each step `t`.
    Id3(Id3Config),
    /// PaFI: the budget's smallest-magnitude entries, chosen once at construction.
    Pafi,
    /// BitFit: every trainable 1-D tensor (biases, LayerNorm/BatchNorm γ and β), as the toolkit
    /// does, or only the biases (paths ending in `.bias`, the BitFit paper's definition). With a
    /// budget, the candidates are taken whole in model order and the one at the boundary is cut
    /// to its first entries, as the toolkit does.
    BitFit {
        /// Only `.bias` paths instead of every 1-D tensor.
        bias_only: bool,
    },
}

impl Selection {
    /// The method's name in files (`id3`, `pafi`, `bitfit`).
    pub fn name(&self) -> &'static str {
        match self {
            Selection::Id3(_) => "id3",
            Selection::Pafi => "pafi",
            Selection::BitFit { .. } => "bitfit",
        }
    }
}

/// Configuration of a [`SelectiveOptimizer`](crate::SelectiveOptimizer).
///
/// The candidates are the model's trainable float parameters (`require_grad`); freeze a
/// parameter to keep it out of the selection. Parameters matched by a `choose_all` group are
/// trained in full and counted against the budget (the toolkit's `choose_all`).
#[derive(Clone, Debug)]
pub struct SelectiveConfig {
    /// The selection method.
    pub method: Selection,
    /// Total number of trained entries, `choose_all` parameters included. Required by ID3 and
    /// PaFI; optional for BitFit (without one, every candidate is trained in full).
    pub budget: Option<usize>,
    /// Parameter groups trained in full.
    pub choose_all: Vec<ParamGroup>,
    /// Check after every step that the budget holds and unchosen entries are unchanged (keeps a
    /// copy of the initial trainable parameters).
    pub verify: bool,
    /// Apply the wrapped optimizer's weight decay to the chosen entries. Off by default: the
    /// toolkit forces `weight_decay = 0` on the optimizer it wraps, so the chosen entries follow
    /// the optimizer without decay (unchosen entries never move either way).
    pub decay_chosen: bool,
}

impl SelectiveConfig {
    /// ID3 with `budget` entries unmasked over `max_steps` steps (`eps = 1e-8`, `exp = 1`).
    pub fn id3(budget: usize, max_steps: usize) -> Self {
        Self::new(
            Selection::Id3(Id3Config {
                max_steps,
                eps: 1e-8,
                exp: 1.0,
            }),
            Some(budget),
        )
    }

    /// PaFI with the `budget` smallest-magnitude entries.
    pub fn pafi(budget: usize) -> Self {
        Self::new(Selection::Pafi, Some(budget))
    }

    /// BitFit over every 1-D parameter (the toolkit's set), with no budget.
    pub fn bitfit() -> Self {
        Self::new(Selection::BitFit { bias_only: false }, None)
    }

    /// A configuration from its parts.
    pub fn new(method: Selection, budget: Option<usize>) -> Self {
        Self {
            method,
            budget,
            choose_all: Vec::new(),
            verify: false,
            decay_chosen: false,
        }
    }

    /// Set ID3's `eps` (ignored by other methods).
    pub fn with_eps(mut self, eps: f64) -> Self {
        if let Selection::Id3(c) = &mut self.method {
            c.eps = eps;
        }
        self
    }

    /// Set ID3's `exp` (ignored by other methods).
    pub fn with_exp(mut self, exp: f64) -> Self {
        if let Selection::Id3(c) = &mut self.method {
            c.exp = exp;
        }
        self
    }

    /// Set BitFit's `bias_only` (ignored by other methods): only `.bias` paths, the BitFit
    /// paper's definition, instead of every 1-D tensor.
    pub fn with_bias_only(mut self, bias_only: bool) -> Self {
        if let Selection::BitFit { bias_only: b } = &mut self.method {
            *b = bias_only;
        }
        self
    }

    /// Keep the wrapped optimizer's weight decay on the chosen entries (see
    /// [`decay_chosen`](Self::decay_chosen)).
    pub fn with_decay_chosen(mut self, on: bool) -> Self {
        self.decay_chosen = on;
        self
    }

    /// Set the budget.
    pub fn with_budget(mut self, budget: usize) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Train every parameter of `group` in full (counted against the budget).
    pub fn with_choose_all(mut self, group: ParamGroup) -> Self {
        self.choose_all.push(group);
        self
    }

    /// Train every parameter whose path matches `pattern` in full.
    ///
    /// # Errors
    /// The pattern does not compile.
    pub fn with_choose_all_regex(self, pattern: &str) -> Result<Self> {
        let group = ParamGroup::from_regex(pattern)
            .map_err(|e| SelectiveError::config("choose_all", format!("`{pattern}`: {e:?}")))?;
        Ok(self.with_choose_all(group))
    }

    /// Turn `verify` on or off.
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Check the values that do not depend on the model.
    ///
    /// # Errors
    /// Budget 0, missing budget for ID3/PaFI, `max_steps` 0, `eps` negative or not finite,
    /// `exp` not finite.
    pub fn validate(&self) -> Result<()> {
        match (&self.method, self.budget) {
            (Selection::Id3(_) | Selection::Pafi, None) => {
                return Err(SelectiveError::config(
                    "budget",
                    format!("{} needs a budget", self.method.name()),
                ));
            }
            (_, Some(0)) => {
                return Err(SelectiveError::config("budget", "must be at least 1"));
            }
            _ => {}
        }
        if let Selection::Id3(c) = &self.method {
            if c.max_steps == 0 {
                return Err(SelectiveError::config("max_steps", "must be at least 1"));
            }
            if !(c.eps.is_finite() && c.eps >= 0.0) {
                return Err(SelectiveError::config(
                    "eps",
                    format!("{} must be finite and >= 0", c.eps),
                ));
            }
            if !c.exp.is_finite() {
                return Err(SelectiveError::config(
                    "exp",
                    format!("{} must be finite", c.exp),
                ));
            }
        }
        Ok(())
    }
}
