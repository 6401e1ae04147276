use super::*;
use crate::engine::{Params, Stage};

fn params(extra: &str) -> Params {
    let mut t: toml::Table = Train.defaults().parse().unwrap();
    let over: toml::Table = extra.parse().unwrap();
    for (k, v) in over {
        match (t.get_mut(&k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => dst.extend(src),
            (_, v) => {
                t.insert(k, v);
            }
        }
    }
    Params(t)
}

#[test]
fn defaults_parse_into_the_documented_config() {
    let p = params("");
    assert!(Train.check(&p).is_ok(), "{:?}", Train.check(&p));
    let tp: TrainParams = p.decode().unwrap();
    let cfg = tp.config().unwrap();
    assert_eq!(cfg, TrainConfig { fault: None, ..TrainConfig::default() });
    let (init, seed) = tp.init_config().unwrap();
    assert_eq!((init.vocab_size, init.hidden_size, init.num_hidden_layers, seed), (151_669, 64, 2, 0));
    assert_eq!(init.rope_theta, 1e6);
    assert_eq!((tp.device.as_str(), tp.dtype.as_str()), ("auto", "f32"));
}

#[test]
fn bad_values_name_their_parameter() {
    for (text, key) in [
        ("mode = \"half\"", "mode"),
        ("loss = \"hinge\"", "loss"),
        ("epochs = 0", "epochs"),
        ("batch_size = 0", "batch_size"),
        ("warmup_ratio = 1.5", "warmup_ratio"),
        ("best_metric = \"auc\"", "best_metric"),
        ("device = \"tpu\"", "device"),
        ("dtype = \"f64\"", "dtype"),
        ("model = \"hf:nope\"", "model"),
        ("checkpoint_every = 0", "checkpoint_every"),
        ("match_loss = -1.0", "match_loss"),
        ("group_size = 1", "group_size"),
        ("group_size = -3", "group_size"),
        ("mode = \"lora\"\n[lora]\ntarget_modules = [\"qkv\"]", "lora.target_modules"),
        ("mode = \"lora\"\n[lora]\ndropout = 1.0", "lora.dropout"),
        ("[init]\nnum_key_value_heads = 3", "init.num_key_value_heads"),
        ("[init]\nhead_dim = 7", "init.head_dim"),
    ] {
        let err = Train.check(&params(text)).expect_err(text);
        assert_eq!(err.key, key, "{text}: {err:?}");
    }
    let lora = params("mode = \"lora\"\nloss = \"pairwise\"\nbest_metric = \"val_ndcg@10\"");
    assert!(Train.check(&lora).is_ok());
    let cfg = lora.decode::<TrainParams>().unwrap().config().unwrap();
    assert_eq!(
        cfg.mode,
        Mode::Lora(LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()]
        })
    );
}

#[test]
fn inputs_identify_the_starting_model_and_where_it_computes() {
    // `device = "auto"` resolves to what this machine computes on; CPU and GPU runs get different keys.
    let here = ExternalInput::Remote(crate::model::device::compute_identity("auto"));
    assert_eq!(Train.inputs(&params("model = \"random\"")), std::slice::from_ref(&here));
    assert_eq!(
        Train.inputs(&params("model = \"random\"\ndevice = \"cuda\"")),
        [ExternalInput::Remote("compute:cuda".into())]
    );
    assert_eq!(
        Train.inputs(&params("model = \"hf:Qwen/Qwen3-Reranker-0.6B@abc\"")),
        [ExternalInput::Remote("hf:Qwen/Qwen3-Reranker-0.6B@abc".into()), here.clone()]
    );
    assert_eq!(
        Train.inputs(&params("")),
        [ExternalInput::Remote("hf:Qwen/Qwen3-Reranker-0.6B@main".into()), here.clone()]
    );
    assert_eq!(
        Train.inputs(&params("model = \"models/tiny\"")),
        [
            ExternalInput::File("models/tiny/config.json".into()),
            ExternalInput::File("models/tiny/model.safetensors".into()),
            here
        ]
    );
}

#[test]
fn fault_specs_parse() {
    assert_eq!("nan_loss@3".parse::<Fault>().unwrap(), Fault::NanLoss(3));
    assert_eq!("stop@10".parse::<Fault>().unwrap(), Fault::StopAfter(10));
    assert_eq!("abort@2".parse::<Fault>().unwrap(), Fault::AbortAfter(2));
    for bad in ["nan", "nan_loss@x", "explode@3"] {
        assert!(bad.parse::<Fault>().is_err(), "{bad}");
    }
}
