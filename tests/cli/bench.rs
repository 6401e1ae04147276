//! `pipe bench parity` runs its CPU-vs-device comparison (here CPU vs CPU, and bf16 vs f32), and a
//! CUDA device on a CPU-only build is a clear error rather than a silent CPU fallback.

use crate::util::Project;

#[test]
fn bench_parity_runs_and_reports_json() {
    let p = Project::new();
    let v = p.run_json(&["bench", "parity", "--device", "cpu"]);
    assert_eq!(v["pass"], true, "{v}");
    assert_eq!(v["f32"]["max_abs_logit_diff"], 0.0);
    // The fused AdamW op on the CPU runs the same loop as the reference: no difference at all.
    assert_eq!(v["fused_adamw"]["max_abs_diff"], 0.0, "{v}");
    assert_eq!(v["scatter_and_write_back"]["max_abs_diff"], 0.0, "{v}");
    assert_eq!(v["sum_squares"]["rel_diff"], 0.0, "{v}");
    // Attention alone at rows of 37 to 1,100, the same dtype on both sides: the same code here.
    for dtype in ["f32", "bf16"] {
        assert_eq!(v[dtype]["max_rel_attention_diff_t37_to_1100"], 0.0, "{v}");
    }
    // The layers differentiated by hand agree with autograd's gradients.
    let by_hand = v["f32"]["max_rel_layer_grad_diff_by_hand"].as_f64().unwrap();
    assert!(by_hand < 1e-5, "{v}");
    let bf16 = v["bf16"]["max_abs_logit_diff"].as_f64().unwrap();
    assert!(bf16 > 0.0 && bf16 < 0.05, "bf16 differs from f32, within bf16 rounding: {bf16}");
    if !cfg!(feature = "cuda") {
        let out = p.pipe(&["bench", "parity", "--device", "cuda"]);
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains("--features cuda"), "{out}");
        let out = p.pipe(&["bench", "kernels"]);
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains("needs a build with the `cuda` feature"), "{out}");
    }
}

#[test]
fn bench_train_step_times_real_steps() {
    let p = Project::new();
    let args = [
        "bench",
        "train-step",
        "--arch",
        "tiny",
        "--batch",
        "4",
        "--seq",
        "48",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--dtype",
        "f32",
        "--device",
        "cpu",
    ];
    let v = p.run_json(&args);
    assert_eq!(v["impl"], "pipe");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    // Recomputing activations trains to the same loss.
    let r = p.run_json(&[&args[..], &["--recompute"]].concat());
    assert_eq!((v["recompute"].clone(), r["recompute"].clone()), (false.into(), true.into()));
    assert_eq!(r["loss"], v["loss"], "{v}\n{r}");
    // So does differentiating the layers with autograd instead of by hand
    let a = p.run_json(&[&args[..], &["--autograd-layers"]].concat());
    assert_eq!(
        (v["layers_differentiated"].as_str(), a["layers_differentiated"].as_str()),
        (Some("by hand"), Some("autograd"))
    );
    // (after three updates from gradients equal up to rounding)
    let (la, lv) = (a["loss"].as_f64().unwrap(), v["loss"].as_f64().unwrap());
    assert!((la - lv).abs() <= 1e-5 * lv.abs(), "{v}\n{a}");
    assert!(v["samples_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["loss"].as_f64().unwrap().is_finite());
    assert_eq!(
        v["params"],
        151_669 * 64 + 2 * (4 * 16 * 64 * 2 + 2 * 16 * 64 * 2 + 3 * 64 * 128 + 2 * 64 + 2 * 16) + 64
    );
}

#[test]
fn bench_layer_times_a_layer_and_its_parts() {
    let p = Project::new();
    let v = p.run_json(&[
        "bench", "layer", "--arch", "tiny", "--batch", "2", "--seq", "24", "--iters", "1", "--dtype", "f32",
        "--device", "cpu",
    ]);
    assert_eq!(v["layers"], 2, "{v}");
    let s = v["seconds"].as_object().expect("a `seconds` object");
    for part in [
        "layer_forward",
        "layer_forward_backward",
        "layer_forward_backward_by_hand",
        "projection_matmuls_forward",
        "attention_core_forward_backward",
        "attention_core_forward_backward_primitive_ops",
        "two_rms_norms_forward_backward",
        "qk_norm_rope_forward_backward",
        "mlp_forward_backward",
    ] {
        let secs = s.get(part).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("no {part} in {v}"));
        assert!(secs > 0.0 && secs.is_finite(), "{part}: {secs}");
    }
    let parts = v["by_hand_backward_parts_seconds"].as_object().expect("the hand-written backward's parts");
    for part in ["matmuls", "swiglu", "rms_norms", "attention", "qk_norm_rope"] {
        let secs = parts.get(part).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("no {part} in {v}"));
        assert!(secs > 0.0 && secs.is_finite(), "{part}: {secs}");
    }
    let parts = v["attention_parts_seconds"].as_object().expect("attention's parts");
    assert_eq!(parts.len(), 6, "{v}");
    assert!(parts.values().all(|x| x.as_f64().is_some_and(|s| s > 0.0)), "{v}");
    let est = v["estimated_step_body_seconds"].as_f64().unwrap();
    assert!((est - 2.0 * s["layer_forward_backward_by_hand"].as_f64().unwrap()).abs() < 1e-12, "{v}");
}
