//! Writing a `torch.save` file: the PyTorch ≥ 1.6 zip format that `torch.load` (also with
//! `weights_only=True`), coin's own reader ([`crate::store::pickle`]) and candle's read, for
//! CoIN's loaders, which hard-code `adapter_model.bin` and `non_lora_trainables.bin`.
//!
//! The archive is an uncompressed zip with one folder `archive/`: `data.pkl` (a protocol-2
//! pickle of an `OrderedDict` name → tensor, each tensor
//! `torch._utils._rebuild_tensor_v2(persistent storage, 0, size, stride, False, OrderedDict())`
//! with its own storage), `data/<i>` (the raw little-endian storage bytes, starting 64-byte
//! aligned as torch's writer does), `byteorder` (`little`) and `version` (`3`). The pickle uses
//! only what torch's `weights_only` unpickler allows. Zip64 is not written: a file over 4 GiB is
//! refused.

use candle_core::{DType, Tensor};

use crate::ml::{MlError, Result};

/// torch's storage class name of a dtype.
fn storage_class(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F16 => "HalfStorage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => {
            return Err(MlError::Input(format!(
                "cannot write dtype {other:?} in a torch.save file"
            )))
        }
    })
}

fn le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => {
            return Err(MlError::Input(format!(
                "cannot write dtype {other:?} in a torch.save file"
            )))
        }
    })
}

/// A protocol-2 pickle writer for the few opcodes a state dict needs.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }

    fn string(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: u64) {
        if v < 256 {
            self.0.extend_from_slice(&[b'K', v as u8]); // BININT1
        } else if v < 65536 {
            self.0.push(b'M'); // BININT2
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]); // LONG1, 8 bytes (positive, < 2^63)
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn int_tuple(&mut self, vs: &[usize]) {
        self.0.push(b'(');
        for &v in vs {
            self.int(v as u64);
        }
        self.0.push(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R"); // EMPTY_TUPLE, REDUCE
    }
}

/// CRC-32 (IEEE, as zip uses).
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c = table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

/// An uncompressed zip built in memory, each entry's data 64-byte aligned.
struct Zip {
    out: Vec<u8>,
    central: Vec<u8>,
    entries: u16,
}

impl Zip {
    fn too_big() -> MlError {
        MlError::Input("a torch.save file over 4 GiB (zip64) is not supported".into())
    }

    fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let offset = u32::try_from(self.out.len()).map_err(|_| Self::too_big())?;
        let size = u32::try_from(data.len()).map_err(|_| Self::too_big())?;
        let crc = crc32(data);
        // Pad with an extra field ("FB", as torch) so that the data starts 64-byte aligned.
        let header_end = self.out.len() + 30 + name.len() + 4;
        let pad = (64 - header_end % 64) % 64;
        let mut extra = Vec::with_capacity(4 + pad);
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.resize(4 + pad, b'Z');
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&0u16.to_le_bytes()); // method: stored
            v.extend_from_slice(&0u16.to_le_bytes()); // time
            v.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
        };
        self.out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        self.out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common(&mut self.out);
        self.out
            .extend_from_slice(&(extra.len() as u16).to_le_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(&extra);
        self.out.extend_from_slice(data);

        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes()); // version made by
        c.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common(c);
        c.extend_from_slice(&0u16.to_le_bytes()); // extra length
        c.extend_from_slice(&0u16.to_le_bytes()); // comment length
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.entries = self
            .entries
            .checked_add(1)
            .ok_or_else(|| MlError::Input("more than 65535 tensors in a torch.save file".into()))?;
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        let cd_offset = u32::try_from(self.out.len()).map_err(|_| Self::too_big())?;
        let cd_size = u32::try_from(self.central.len()).map_err(|_| Self::too_big())?;
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out.extend_from_slice(&self.entries.to_le_bytes());
        self.out.extend_from_slice(&self.entries.to_le_bytes());
        self.out.extend_from_slice(&cd_size.to_le_bytes());
        self.out.extend_from_slice(&cd_offset.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        Ok(self.out)
    }
}

/// The bytes of a `torch.save({name: tensor, …})` file (an `OrderedDict` in the given order).
pub fn torch_save_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.empty_ordered_dict();
    p.0.push(b'('); // MARK
    let mut storages = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        let class = storage_class(t.dtype())?;
        p.string(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'(');
        p.0.push(b'(');
        p.string("storage");
        p.global("torch", class);
        p.string(&i.to_string());
        p.string("cpu");
        p.int(t.elem_count() as u64);
        p.0.push(b't');
        p.0.push(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.int_tuple(t.dims());
        let mut strides = vec![1usize; t.rank()];
        for d in (0..t.rank().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * t.dims()[d + 1];
        }
        p.int_tuple(&strides);
        p.0.push(0x89); // NEWFALSE: requires_grad
        p.empty_ordered_dict(); // backward hooks
        p.0.push(b't');
        p.0.push(b'R');
        storages.push(le_bytes(&t.to_device(&candle_core::Device::Cpu)?)?);
    }
    p.0.push(b'u'); // SETITEMS
    p.0.push(b'.'); // STOP
    let mut zip = Zip {
        out: Vec::new(),
        central: Vec::new(),
        entries: 0,
    };
    zip.add("archive/data.pkl", &p.0)?;
    zip.add("archive/byteorder", b"little")?;
    for (i, s) in storages.iter().enumerate() {
        zip.add(&format!("archive/data/{i}"), s)?;
    }
    zip.add("archive/version", b"3\n")?;
    zip.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn crc32_of_a_known_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn candle_reads_back_what_we_write_bit_exactly() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(
            (0..300).map(|i| i as f32 * 0.37 - 5.0).collect::<Vec<_>>(),
            (3, 100),
            &dev,
        )
        .expect("a");
        let b = Tensor::from_vec(vec![1.5f64, -2.25], 2, &dev).expect("b");
        let c = a.to_dtype(DType::BF16).expect("bf16");
        let tensors = vec![
            ("base_model.model.x.lora_A.weight".to_string(), a.clone()),
            ("b".to_string(), b.clone()),
            ("c".to_string(), c.clone()),
        ];
        let bytes = torch_save_bytes(&tensors).expect("writes");
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("adapter_model.bin");
        std::fs::write(&f, bytes).expect("w");
        let back = candle_core::pickle::read_all(&f).expect("candle reads it");
        assert_eq!(back.len(), 3);
        for (name, want) in &tensors {
            let (_, got) = back.iter().find(|(n, _)| n == name).expect("name");
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            let g: Vec<f64> = got
                .to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("g");
            let w: Vec<f64> = want
                .to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("w");
            assert_eq!(g, w, "{name}");
        }
    }
}
