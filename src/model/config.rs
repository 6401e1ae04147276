//! The Qwen3 `config.json`, read in both the transformers 4.x layout (`rope_theta` at the top
//! level) and the 5.x layout (`rope_parameters: {rope_theta, rope_type}`), and written back so that
//! both generations of transformers load it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ModelError;

/// transformers' defaults (5.x `Qwen3Config`, identical in 4.x for these fields). A config.json that
/// omits one of them means this value to transformers, so it must mean the same to us.
const DEFAULT_HEAD_DIM: usize = 128;
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_MAX_POSITIONS: usize = 32_768;
const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// The fields of a Qwen3 config that change the computation, plus everything else the file held
/// (kept verbatim in `extra` so that a load → save round trip loses nothing transformers reads).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub initializer_range: f64,
    /// The storage dtype named by the file (`dtype` in 5.x, `torch_dtype` in 4.x), e.g. "bfloat16".
    pub dtype: Option<String>,
    /// Every other key of the source file, written back unchanged.
    pub extra: Map<String, Value>,
}

/// The on-disk shape: every computational field optional so that defaults and both layouts can be
/// resolved in one place, with unknown keys collected rather than rejected (HF configs carry many
/// keys that do not affect the forward pass, e.g. `bos_token_id`, `use_cache`).
#[derive(Debug, Deserialize, Serialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    initializer_range: Option<f64>,
    use_sliding_window: Option<bool>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn required(v: Option<usize>, key: &str) -> Result<usize, ModelError> {
    match v {
        Some(0) => Err(invalid(format!("`{key}` must be > 0"))),
        Some(n) => Ok(n),
        None => Err(invalid(format!("missing required key `{key}`"))),
    }
}

/// Reads the rope type and θ from either layout; only the plain ("default") RoPE is implemented,
/// so a scaled RoPE (yarn, linear, dynamic…) is an error rather than a silently different model.
fn resolve_rope(raw: &RawConfig) -> Result<f64, ModelError> {
    let mut theta = raw.rope_theta;
    let mut rope_type: Option<String> = None;
    if let Some(params) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        let obj = params.as_object().ok_or_else(|| invalid("`rope_parameters` must be an object"))?;
        // transformers 5.x lets rope_parameters win over a top-level rope_theta.
        if let Some(t) = obj.get("rope_theta") {
            theta = Some(t.as_f64().ok_or_else(|| invalid("`rope_parameters.rope_theta` must be a number"))?);
        }
        if let Some(t) = obj.get("rope_type") {
            rope_type = t.as_str().map(str::to_owned);
        }
    }
    if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let t = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("unknown");
        if t != "default" {
            return Err(invalid(format!("rope_scaling of type `{t}` is not supported (only the default RoPE is)")));
        }
    }
    if let Some(t) = rope_type {
        if t != "default" {
            return Err(invalid(format!("rope_type `{t}` is not supported (only `default` is)")));
        }
    }
    let theta = theta.unwrap_or(DEFAULT_ROPE_THETA);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(invalid(format!("rope_theta must be positive, got {theta}")));
    }
    Ok(theta)
}

impl Qwen3Config {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| invalid(format!("config.json is not a valid Qwen3 config: {e}")))?;
        if let Some(mt) = &raw.model_type {
            if mt != "qwen3" {
                return Err(invalid(format!(
                    "model_type is `{mt}`, expected `qwen3` (only Qwen3 decoders are supported)"
                )));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(invalid(format!("hidden_act `{act}` is not supported (Qwen3 uses `silu`)")));
            }
        }
        if raw.use_sliding_window == Some(true) {
            return Err(invalid("use_sliding_window = true is not supported (no Qwen3 release uses it)"));
        }
        let rope_theta = resolve_rope(&raw)?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(invalid(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(DEFAULT_HEAD_DIM);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(format!("head_dim must be even and > 0 for RoPE, got {head_dim}")));
        }
        let extra = raw.extra;
        Ok(Self {
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            hidden_size: required(raw.hidden_size, "hidden_size")?,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(DEFAULT_RMS_NORM_EPS),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(DEFAULT_MAX_POSITIONS),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            initializer_range: raw.initializer_range.unwrap_or(DEFAULT_INITIALIZER_RANGE),
            dtype: raw.dtype.or(raw.torch_dtype),
            extra,
        })
    }

    /// A config with only the computational fields set, for tests, `random` models and the
    /// quickstart.
    #[allow(clippy::too_many_arguments)]
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: DEFAULT_RMS_NORM_EPS,
            rope_theta: DEFAULT_ROPE_THETA,
            max_position_embeddings: DEFAULT_MAX_POSITIONS,
            tie_word_embeddings,
            attention_bias: false,
            initializer_range: DEFAULT_INITIALIZER_RANGE,
            dtype: None,
            extra: Map::new(),
        }
    }

    /// Query heads per key/value head (GQA group size).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Every parameter the model holds, by its Hugging Face name, with its shape, in a fixed order.
    /// `lm_head.weight` appears only for untied models, as in transformers' own checkpoints.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (name, rows, cols) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![rows, cols]));
                if self.attention_bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_owned(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_owned(), vec![self.vocab_size, h]));
        }
        out
    }

    /// The config as transformers writes it. RoPE θ goes into both `rope_theta` (read by 4.x) and
    /// `rope_parameters` (read by 5.x, which prefers it when both are present), and the dtype into
    /// both `torch_dtype` and `dtype`, so that either generation loads the file unchanged.
    pub fn to_hf_json(&self, dtype: Option<&str>) -> Value {
        let mut m = self.extra.clone();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        set("architectures", Value::from(vec!["Qwen3ForCausalLM"]));
        set("model_type", Value::from("qwen3"));
        set("vocab_size", Value::from(self.vocab_size));
        set("hidden_size", Value::from(self.hidden_size));
        set("intermediate_size", Value::from(self.intermediate_size));
        set("num_hidden_layers", Value::from(self.num_hidden_layers));
        set("num_attention_heads", Value::from(self.num_attention_heads));
        set("num_key_value_heads", Value::from(self.num_key_value_heads));
        set("head_dim", Value::from(self.head_dim));
        set("hidden_act", Value::from("silu"));
        set("rms_norm_eps", Value::from(self.rms_norm_eps));
        set("rope_theta", Value::from(self.rope_theta));
        set("rope_parameters", serde_json::json!({"rope_theta": self.rope_theta, "rope_type": "default"}));
        set("rope_scaling", Value::Null);
        set("max_position_embeddings", Value::from(self.max_position_embeddings));
        set("tie_word_embeddings", Value::from(self.tie_word_embeddings));
        set("attention_bias", Value::from(self.attention_bias));
        set("initializer_range", Value::from(self.initializer_range));
        set("use_sliding_window", Value::from(false));
        if let Some(d) = dtype.map(str::to_owned).or_else(|| self.dtype.clone()) {
            set("torch_dtype", Value::from(d.clone()));
            set("dtype", Value::from(d));
        }
        // Keys sorted like transformers' own output, which makes diffs between saves readable.
        let mut sorted: Vec<(String, Value)> = m.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        Value::Object(sorted.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
      "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
      "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
      "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
      "use_cache": true, "use_sliding_window": false, "vocab_size": 151669
    }"#;

    const V5: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "dtype": "float32",
      "head_dim": 8, "hidden_act": "silu", "hidden_size": 8, "intermediate_size": 16,
      "layer_types": ["full_attention"], "model_type": "qwen3", "num_attention_heads": 2,
      "num_hidden_layers": 1, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
      "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
      "tie_word_embeddings": false, "vocab_size": 64
    }"#;

    #[test]
    fn parses_transformers_4_layout() {
        let c = Qwen3Config::from_json_str(V4).unwrap();
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (16, 8));
        assert_eq!(c.kv_groups(), 2);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.extra["eos_token_id"], 151645);
        assert!(!c.param_shapes().iter().any(|(n, _)| n == "lm_head.weight"));
    }

    #[test]
    fn parses_transformers_5_layout() {
        let c = Qwen3Config::from_json_str(V5).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.head_dim, 8);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
        assert_eq!(c.param_shapes().last().unwrap().0, "lm_head.weight");
    }

    #[test]
    fn rope_parameters_win_over_top_level_theta_like_transformers_5() {
        let text = V5.replace("\"rms_norm_eps\"", "\"rope_theta\": 77.0, \"rms_norm_eps\"");
        assert_eq!(Qwen3Config::from_json_str(&text).unwrap().rope_theta, 5000.0);
    }

    #[test]
    fn written_config_reparses_to_the_same_model_in_both_layouts() {
        for src in [V4, V5] {
            let c = Qwen3Config::from_json_str(src).unwrap();
            let out = c.to_hf_json(None);
            assert_eq!(out["model_type"], "qwen3");
            assert_eq!(out["architectures"][0], "Qwen3ForCausalLM");
            assert_eq!(out["rope_parameters"]["rope_theta"], out["rope_theta"]);
            let back = Qwen3Config::from_json_str(&out.to_string()).unwrap();
            assert_eq!(back.param_shapes(), c.param_shapes());
            assert_eq!(back.rope_theta, c.rope_theta);
            // Only the 4.x-only legacy key for the theta was added; nothing else was lost.
            for k in c.extra.keys() {
                assert!(back.extra.contains_key(k), "lost key {k}");
            }
        }
    }

    #[test]
    fn rejects_what_we_do_not_implement() {
        let yarn = V5.replace("\"default\"", "\"yarn\"");
        assert!(Qwen3Config::from_json_str(&yarn).unwrap_err().to_string().contains("yarn"));
        let llama = V5.replace("\"qwen3\"", "\"llama\"");
        assert!(Qwen3Config::from_json_str(&llama).is_err());
        let bad_gqa = V5.replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 3");
        assert!(Qwen3Config::from_json_str(&bad_gqa).is_err());
        let missing = V5.replace("\"hidden_size\": 8,", "");
        assert!(Qwen3Config::from_json_str(&missing).unwrap_err().to_string().contains("hidden_size"));
    }
}
