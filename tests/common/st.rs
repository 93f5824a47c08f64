//! Build safetensors bytes for tests (several dtypes, deterministic contents).
#![allow(dead_code)]

/// One tensor: name, dtype name, shape, raw little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl T {
    /// An F32 tensor from values.
    pub fn f32(name: &str, shape: &[u64], values: &[f32]) -> T {
        T {
            name: name.into(),
            dtype: "F32",
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    /// An F16 tensor from values.
    pub fn f16(name: &str, shape: &[u64], values: &[f32]) -> T {
        T {
            name: name.into(),
            dtype: "F16",
            shape: shape.to_vec(),
            data: values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
    /// A BF16 tensor from values.
    pub fn bf16(name: &str, shape: &[u64], values: &[f32]) -> T {
        T {
            name: name.into(),
            dtype: "BF16",
            shape: shape.to_vec(),
            data: values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
    /// An I64 tensor from values.
    pub fn i64(name: &str, shape: &[u64], values: &[i64]) -> T {
        T {
            name: name.into(),
            dtype: "I64",
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Serialise tensors (in the given order) as a safetensors file, with `__metadata__`.
pub fn safetensors(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.data.len() as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("json");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

/// A small LoRA-like adapter: values shifted by `shift` in the `b` tensors only.
pub fn adapter(shift: f32) -> Vec<u8> {
    let a: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    let b: Vec<f32> = (0..64).map(|i| (i as f32 / 32.0) + shift).collect();
    safetensors(&[
        T::f32(
            "base_model.model.layers.0.q_proj.lora_A.weight",
            &[4, 16],
            &a,
        ),
        T::f32(
            "base_model.model.layers.0.q_proj.lora_B.weight",
            &[16, 4],
            &b,
        ),
        T::f16(
            "base_model.model.layers.0.v_proj.lora_A.weight",
            &[4, 16],
            &a,
        ),
        T::bf16(
            "base_model.model.layers.0.v_proj.lora_B.weight",
            &[16, 4],
            &b,
        ),
        T::i64("step", &[1], &[7]),
    ])
}
