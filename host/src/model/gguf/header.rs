//! The binary layout of a GGUF file (versions 2 and 3, little-endian): a header, the
//! metadata key/value pairs, the tensor descriptions, then the tensor data, aligned.

use super::metadata::{Metadata, Value};
use crate::model::quant::QuantType;
use crate::model::weights::DType;
use std::collections::BTreeMap;

/// "GGUF" read as a little-endian u32.
const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: usize = 32;
/// Deepest nesting of arrays accepted (GGUF writers produce 1).
const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions a tensor may have.
const MAX_DIMS: u32 = 4;

/// One tensor as the file describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// Dimensions outermost first (GGUF stores them innermost first): `[rows, cols]`.
    pub shape: Vec<usize>,
    /// Byte range of the data within the file.
    pub range: std::ops::Range<usize>,
}

/// Everything before the tensor data.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Parses `bytes`, a whole GGUF file. The error message names the key or tensor at fault.
pub fn parse(bytes: &[u8]) -> Result<Header, String> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r
        .take(4)
        .map_err(|_| "file too short for a GGUF header".to_string())?;
    if magic != MAGIC {
        return Err(format!(
            "bad magic {:?}: not a GGUF file (expected \"GGUF\")",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = r.u32().map_err(|e| format!("header: {e}"))?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    let n_tensors = r.u64().map_err(|e| format!("header: {e}"))?;
    let n_kv = r.u64().map_err(|e| format!("header: {e}"))?;

    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| format!("metadata entry {i} of {n_kv}: key: {e}"))?;
        let value = r
            .value(0)
            .map_err(|e| format!("metadata key {key} (entry {i} of {n_kv}): {e}"))?;
        metadata.values.insert(key, value);
    }

    let mut described = Vec::new();
    for i in 0..n_tensors {
        let name = r
            .string()
            .map_err(|e| format!("tensor {i} of {n_tensors}: name: {e}"))?;
        let info = r.tensor_info().map_err(|e| format!("tensor {name}: {e}"))?;
        described.push((name, info));
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                format!("metadata key general.alignment: {v:?} is not a power of two")
            })?,
    };
    let data_start = r.at.next_multiple_of(alignment);
    let mut tensors = BTreeMap::new();
    for (name, (shape, type_id, offset)) in described {
        let dtype = dtype_of(type_id).map_err(|e| format!("tensor {name}: {e}"))?;
        let elems = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor {name}: shape {shape:?} overflows"))?;
        if let DType::Quant(qt) = dtype {
            let row = shape.last().copied().unwrap_or(1);
            if !row.is_multiple_of(qt.block_elems()) {
                return Err(format!(
                    "tensor {name}: row length {row} is not a multiple of {}'s block of {}",
                    qt.name(),
                    qt.block_elems()
                ));
            }
        }
        let size = dtype
            .checked_bytes_for(elems)
            .ok_or_else(|| format!("tensor {name}: shape {shape:?} overflows"))?;
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .ok_or_else(|| format!("tensor {name}: bad data offset {offset}"))?;
        let end = start
            .checked_add(size)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "tensor {name}: data (bytes {start}..{}) runs past the end of the file ({} bytes): truncated?",
                    start.saturating_add(size),
                    bytes.len()
                )
            })?;
        if tensors.contains_key(&name) {
            return Err(format!("tensor {name} is described twice"));
        }
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                range: start..end,
            },
        );
    }
    Ok(Header {
        version,
        metadata,
        tensors,
    })
}

/// The GGML type ids GGUF uses, by name (for messages about the ones not supported).
const TYPE_NAMES: [(u32, &str); 33] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
    (40, "NVFP4"),
];

/// The tensor types this loader reads, for messages.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

fn dtype_of(type_id: u32) -> Result<DType, String> {
    Ok(match type_id {
        0 => DType::F32,
        1 => DType::F16,
        30 => DType::Bf16,
        2 => DType::Quant(QuantType::Q4_0),
        3 => DType::Quant(QuantType::Q4_1),
        6 => DType::Quant(QuantType::Q5_0),
        7 => DType::Quant(QuantType::Q5_1),
        8 => DType::Quant(QuantType::Q8_0),
        10 => DType::Quant(QuantType::Q2K),
        11 => DType::Quant(QuantType::Q3K),
        12 => DType::Quant(QuantType::Q4K),
        13 => DType::Quant(QuantType::Q5K),
        14 => DType::Quant(QuantType::Q6K),
        20 => DType::Quant(QuantType::Iq4Nl),
        23 => DType::Quant(QuantType::Iq4Xs),
        other => {
            let name = TYPE_NAMES.iter().find(|(id, _)| *id == other).map_or_else(
                || format!("unknown type id {other}"),
                |(_, n)| n.to_string(),
            );
            return Err(format!(
                "unsupported tensor type {name} (supported: {SUPPORTED_TYPES})"
            ));
        }
    })
}

/// A cursor over the file's bytes; every read checks the length first.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: needs {n} bytes at offset {}, the file has {}",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count, checked against the bytes left (each element takes at least `min_size`).
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(format!(
                "truncated: a count of {n} at offset {} does not fit in the {left} bytes left",
                self.at - 8
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1)?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| format!("string at offset {} is not UTF-8", self.at - n))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        let ty = self.u32()?;
        self.value_of(ty, depth)
    }

    fn value_of(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool with byte value {b}")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err("arrays nested too deep".into());
                }
                let elem = self.u32()?;
                let n = self.count(1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value_of(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    /// Dimensions (outermost first), type id and data offset of one tensor.
    fn tensor_info(&mut self) -> Result<(Vec<usize>, u32, u64), String> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("{n_dims} dimensions (1 to {MAX_DIMS} supported)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.u64()?;
            dims.push(usize::try_from(d).map_err(|_| format!("dimension {d} too large"))?);
        }
        dims.reverse();
        let ty = self.u32()?;
        let offset = self.u64()?;
        Ok((dims, ty, offset))
    }
}
