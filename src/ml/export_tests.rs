//! Export round trips: each layout read back by an independent reader (coin's pickle reader,
//! its PEFT/CoIN adapter loader) must give the checkpoint's tensors, under the names and shapes
//! CoIN and PEFT use (coin-run-layout.md §3).

use super::*;
use crate::ml::linear::Adapter;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

const LAYERS: usize = 2;
const HIDDEN: usize = 8;
const INTER: usize = 12;
const MM: usize = 6;
const R: usize = 4;

/// (module path under the layer, in, out) of LLaVA's seven targets for the tiny sizes.
fn targets() -> Vec<(&'static str, usize, usize)> {
    vec![
        ("self_attn.q_proj", HIDDEN, HIDDEN),
        ("self_attn.k_proj", HIDDEN, HIDDEN),
        ("self_attn.v_proj", HIDDEN, HIDDEN),
        ("self_attn.o_proj", HIDDEN, HIDDEN),
        ("mlp.gate_proj", HIDDEN, INTER),
        ("mlp.up_proj", HIDDEN, INTER),
        ("mlp.down_proj", INTER, HIDDEN),
    ]
}

fn rand(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random tensor")
}

/// The keys and shapes CoIN's `adapter_model.bin` holds for the tiny model (§3), with
/// `experts` = 0 for LoRA; `prefix` is the module prefix of the layout.
fn expected_keys(prefix: &str, experts: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    for l in 0..LAYERS {
        for (t, i, o) in targets() {
            let k = format!("{prefix}.layers.{l}.{t}");
            if experts == 0 {
                m.insert(format!("{k}.lora_A.weight"), vec![R, i]);
                m.insert(format!("{k}.lora_B.weight"), vec![o, R]);
            } else {
                for e in 0..experts {
                    m.insert(format!("{k}.lora_A.loraA.{e}.weight"), vec![R / experts, i]);
                    m.insert(format!("{k}.lora_B.loraB.{e}.weight"), vec![o, R / experts]);
                }
                m.insert(format!("{k}.lora_router.weight"), vec![experts, i]);
            }
        }
    }
    m
}

/// Write a CoIN-style adapter dir (safetensors, CoIN key names) into `dir`; returns its
/// adapter and projector tensors by key.
fn write_source(
    dir: &Path,
    experts: usize,
    dtype: DType,
    prefix: &str,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let adapter: BTreeMap<String, Tensor> = expected_keys(prefix, experts)
        .into_iter()
        .map(|(k, s)| {
            let t = rand(&s, dtype);
            (k, t)
        })
        .collect();
    let projector: BTreeMap<String, Tensor> = [
        (
            "base_model.model.model.mm_projector.0.weight",
            vec![HIDDEN, MM],
        ),
        ("base_model.model.model.mm_projector.0.bias", vec![HIDDEN]),
        (
            "base_model.model.model.mm_projector.2.weight",
            vec![HIDDEN, HIDDEN],
        ),
        ("base_model.model.model.mm_projector.2.bias", vec![HIDDEN]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), rand(&s, dtype)))
    .collect();
    let pairs = |m: &BTreeMap<String, Tensor>| -> Vec<(String, Tensor)> {
        m.iter().map(|(k, t)| (k.clone(), t.clone())).collect()
    };
    write_safetensors(&dir.join("adapter_model.safetensors"), &pairs(&adapter)).expect("writes");
    write_safetensors(
        &dir.join("non_lora_trainables.safetensors"),
        &pairs(&projector),
    )
    .expect("writes");
    let mut cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 8,
        "lora_dropout": 0.05, "bias": "none", "base_model_name_or_path": "models/tiny",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    if experts > 0 {
        cfg["peft_type"] = "MOE_LORA_CoIN".into();
        cfg["task_type"] = "CAUSAL_LM_CoIN".into();
        cfg["expert_num"] = experts.into();
    }
    write_atomic(dir.join("adapter_config.json"), cfg.to_string()).expect("writes");
    (adapter, projector)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    };
    a.dims() == b.dims() && f(a) == f(b)
}

/// Both directories load with coin's adapter loader to the same modules, tensors and projector.
fn assert_same_adapter(src: &Path, dst: &Path) {
    let a = PeftAdapter::load(src, &Device::Cpu, DType::F32).expect("source loads");
    let b = PeftAdapter::load(dst, &Device::Cpu, DType::F32).expect("export loads");
    assert_eq!(a.kind, b.kind);
    assert_eq!(a.alpha, b.alpha);
    assert_eq!(a.rank(), b.rank());
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>()
    );
    for (name, x) in &a.layers {
        let ok = match (x, &b.layers[name]) {
            (Adapter::Lora(x), Adapter::Lora(y)) => same(&x.a, &y.a) && same(&x.b, &y.b),
            (Adapter::MoeLora(x), Adapter::MoeLora(y)) => {
                same(&x.a, &y.a) && same(&x.b, &y.b) && same(&x.router, &y.router)
            }
            _ => false,
        };
        assert!(ok, "{name} differs");
    }
    let (pa, pb) = (
        a.projector.expect("source projector"),
        b.projector.expect("exported projector"),
    );
    assert_eq!(
        pa.tensors.keys().collect::<Vec<_>>(),
        pb.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &pa.tensors {
        assert!(same(t, &pb.tensors[k]), "{k} differs");
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&dst).expect("mkdir");
    (t, src, dst)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("reads")).expect("json")
}

#[test]
fn coin_export_of_a_lora_has_coins_names_shapes_values_and_dtype() {
    let (_t, src, dst) = dirs();
    let (adapter, projector) = write_source(
        &src,
        0,
        DType::BF16,
        "base_model.model.model.language_model",
    );
    let out = export_adapter(&src, &dst, ExportFormat::Coin).expect("exports");
    assert_eq!(
        out.files,
        [
            "adapter_config.json",
            "adapter_model.bin",
            "non_lora_trainables.bin",
            "config.json"
        ]
    );
    assert_eq!(out.modules, LAYERS * 7);
    // The pickle reader: CoIN's names (§3), shapes, values and bf16 kept.
    let read: BTreeMap<String, Tensor> = read_tensor_file(&dst.join("adapter_model.bin"))
        .expect("pickle reads")
        .into_iter()
        .collect();
    let want = expected_keys("base_model.model.model", 0);
    assert_eq!(
        read.iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect::<BTreeMap<_, _>>(),
        want
    );
    for (k, t) in &adapter {
        let coin = k.replace("model.language_model.layers", "model.layers");
        assert!(same(t, &read[&coin]), "{k}");
        assert_eq!(read[&coin].dtype(), DType::BF16);
    }
    let proj: BTreeMap<String, Tensor> = read_tensor_file(&dst.join("non_lora_trainables.bin"))
        .expect("pickle reads")
        .into_iter()
        .collect();
    assert_eq!(
        proj.keys().collect::<Vec<_>>(),
        projector.keys().collect::<Vec<_>>()
    );
    for (k, t) in &projector {
        assert!(same(t, &proj[k]), "{k}");
    }
    // coin's CoIN loader reads it back to the same adapter.
    assert_same_adapter(&src, &dst);
    // peft 0.4.0's LoraConfig fields, exactly; no trailing newline, as peft writes it.
    let text = std::fs::read_to_string(dst.join("adapter_config.json")).expect("reads");
    assert!(!text.ends_with('\n'));
    let cfg = json(&dst.join("adapter_config.json"));
    let keys: Vec<&str> = cfg
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "auto_mapping",
            "base_model_name_or_path",
            "bias",
            "fan_in_fan_out",
            "inference_mode",
            "init_lora_weights",
            "layers_pattern",
            "layers_to_transform",
            "lora_alpha",
            "lora_dropout",
            "modules_to_save",
            "peft_type",
            "r",
            "revision",
            "target_modules",
            "task_type"
        ]
    );
    assert_eq!(cfg["lora_alpha"], serde_json::json!(8));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );
    // No config.json in the checkpoint: a LlavaConfig with the tensors' sizes, and a warning.
    let c = json(&dst.join("config.json"));
    assert_eq!(c["hidden_size"], serde_json::json!(HIDDEN));
    assert_eq!(c["intermediate_size"], serde_json::json!(INTER));
    assert_eq!(c["num_hidden_layers"], serde_json::json!(LAYERS));
    assert_eq!(c["mm_hidden_size"], serde_json::json!(MM));
    assert_eq!(c["model_type"], serde_json::json!("llava"));
    assert!(out.warnings.iter().any(|w| w.contains("config.json")));
}

#[test]
fn coin_export_keeps_the_checkpoints_own_config_json() {
    let (_t, src, dst) = dirs();
    write_source(&src, 0, DType::F32, "base_model.model.model");
    write_atomic(src.join("config.json"), "{\"model_type\": \"llava\"}\n").expect("writes");
    let out = export_adapter(&src, &dst, ExportFormat::Coin).expect("exports");
    assert_eq!(
        std::fs::read(dst.join("config.json")).expect("reads"),
        b"{\"model_type\": \"llava\"}\n"
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn coin_export_of_a_moelora_splits_experts_as_coin_saves_them() {
    let (_t, src, dst) = dirs();
    let (adapter, _) = write_source(&src, 2, DType::F32, "base_model.model.model");
    let out = export_adapter(&src, &dst, ExportFormat::Coin).expect("exports");
    assert_eq!(out.kind, AdapterKind::MoeLora { experts: 2 });
    let read: BTreeMap<String, Tensor> = read_tensor_file(&dst.join("adapter_model.bin"))
        .expect("pickle reads")
        .into_iter()
        .collect();
    assert_eq!(
        read.iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect::<BTreeMap<_, _>>(),
        expected_keys("base_model.model.model", 2)
    );
    for (k, t) in &adapter {
        assert!(same(t, &read[k]), "{k}");
    }
    assert_same_adapter(&src, &dst);
    let cfg = json(&dst.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], serde_json::json!("MOE_LORA_CoIN"));
    assert_eq!(cfg["task_type"], serde_json::json!("CAUSAL_LM_CoIN"));
    assert_eq!(cfg["expert_num"], serde_json::json!(2));
    assert_eq!(cfg["task_embedding_dim"], serde_json::json!(64));
}

#[test]
fn peft_export_uses_llava_hf_names_and_reads_back() {
    let (_t, src, dst) = dirs();
    let (adapter, _) = write_source(&src, 0, DType::F32, "base_model.model.model");
    let out = export_adapter(&src, &dst, ExportFormat::Peft).expect("exports");
    assert_eq!(
        out.files,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "non_lora_trainables.safetensors"
        ]
    );
    let read: BTreeMap<String, Tensor> = read_tensor_file(&dst.join("adapter_model.safetensors"))
        .expect("reads")
        .into_iter()
        .collect();
    assert_eq!(
        read.iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect::<BTreeMap<_, _>>(),
        expected_keys("base_model.model.language_model.model", 0)
    );
    for (k, t) in &adapter {
        let hf = k.replace(
            "base_model.model.model.layers",
            "base_model.model.language_model.model.layers",
        );
        assert!(same(t, &read[&hf]), "{k}");
    }
    let proj = read_tensor_file(&dst.join("non_lora_trainables.safetensors")).expect("reads");
    assert_eq!(
        proj.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        crate::ml::peft::ProjectorWeights::NAMES
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_same_adapter(&src, &dst);
    let cfg = json(&dst.join("adapter_config.json"));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(
            ".*language_model.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        )
    );
    assert_eq!(cfg["peft_type"], serde_json::json!("LORA"));
    assert_eq!(cfg["modules_to_save"], Value::Null);
}

#[test]
fn peft_export_refuses_moelora_before_writing() {
    let (_t, src, dst) = dirs();
    write_source(&src, 2, DType::F32, "base_model.model.model");
    let err = export_adapter(&src, &dst, ExportFormat::Peft).expect_err("refused");
    assert!(err.to_string().contains("MoELoRA"), "{err}");
    assert_eq!(std::fs::read_dir(&dst).expect("reads").count(), 0);
}

#[test]
fn safetensors_export_has_coins_own_names() {
    let (_t, src, dst) = dirs();
    write_source(&src, 2, DType::F32, "base_model.model.model");
    let out = export_adapter(&src, &dst, ExportFormat::Safetensors).expect("exports");
    assert_eq!(out.files, ["adapter_config.json", "adapter.safetensors"]);
    let read: BTreeMap<String, Tensor> = read_tensor_file(&dst.join("adapter.safetensors"))
        .expect("reads")
        .into_iter()
        .collect();
    let ad = PeftAdapter::load(&src, &Device::Cpu, DType::F32).expect("loads");
    let mut want = BTreeMap::new();
    for (name, a) in &ad.layers {
        let Adapter::MoeLora(m) = a else {
            panic!("MoELoRA expected")
        };
        want.insert(format!("{name}.lora_A.experts"), m.a.clone());
        want.insert(format!("{name}.lora_B.experts"), m.b.clone());
        want.insert(format!("{name}.lora_router.weight"), m.router.clone());
    }
    for (k, t) in &ad.projector.expect("projector").tensors {
        want.insert(k.clone(), t.clone());
    }
    assert_eq!(
        read.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(read
        .keys()
        .any(|k| k == "language_model.layers.1.mlp.down_proj.lora_A.experts"));
    for (k, t) in &want {
        assert!(same(t, &read[k]), "{k}");
    }
    let cfg = json(&dst.join("adapter_config.json"));
    assert_eq!(cfg["expert_num"], serde_json::json!(2));
}

#[test]
fn a_checkpoint_without_an_adapter_is_refused_with_the_directory() {
    let (_t, src, dst) = dirs();
    std::fs::create_dir_all(&src).expect("mkdir");
    let err = export_adapter(&src, &dst, ExportFormat::Coin).expect_err("refused");
    assert!(err.to_string().contains("adapter_model"), "{err}");
}

#[test]
fn coin_directory_names() {
    let moe = AdapterKind::MoeLora { experts: 8 };
    assert!(coin_dir_name_ok("ScienceQA_llava_lora", AdapterKind::Lora));
    assert!(coin_dir_name_ok("LLaVA-LoRA", AdapterKind::Lora));
    assert!(!coin_dir_name_ok("out", AdapterKind::Lora));
    assert!(coin_dir_name_ok("ScienceQA_llava_MOE_lora", moe));
    assert!(!coin_dir_name_ok("ScienceQA_llava_moe_lora", moe));
    assert!(!coin_dir_name_ok("ScienceQA_llava_lora", moe));
    assert_eq!(coin_dir_name("x_llava_lora", moe), "x_llava_lora_MOE");
    assert_eq!(coin_dir_name("out", AdapterKind::Lora), "out_llava_lora");
    assert_eq!(
        coin_dir_name("out", AdapterKind::MoeLora { experts: 8 }),
        "out_llava_MOE_lora"
    );
    assert_eq!(
        coin_dir_name("x_llava_lora", AdapterKind::Lora),
        "x_llava_lora"
    );
}

#[test]
fn coin_export_without_a_projector_warns_that_coin_needs_one() {
    let (_t, src, dst) = dirs();
    write_source(&src, 0, DType::F32, "base_model.model.model");
    std::fs::remove_file(src.join("non_lora_trainables.safetensors")).expect("rm");
    let out = export_adapter(&src, &dst, ExportFormat::Coin).expect("exports");
    assert!(!out.projector);
    assert!(!dst.join("non_lora_trainables.bin").exists());
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("non_lora_trainables.bin") && w.contains("mm_projector")),
        "{:?}",
        out.warnings
    );
}
