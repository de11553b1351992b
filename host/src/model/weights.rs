//! Weight tensors in their stored dtype, and the `*.safetensors` files they come from
//! (memory-mapped). GGUF files are read by [`super::gguf`].

use super::cpu::matmul::{Matrix, WeightData};
use super::error::{read_json, ModelError, Result};
use super::huge_buffer::HugeBuffer;
use super::quant::QuantType;
use memmap2::Mmap;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types the executor computes with (always widened to f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
    /// GGML block quantization (GGUF files).
    Quant(QuantType),
}

impl DType {
    /// Bytes of `elems` elements (for a quantized type, a multiple of its block).
    pub fn bytes_for(self, elems: usize) -> usize {
        match self {
            DType::F32 => 4 * elems,
            DType::F16 | DType::Bf16 => 2 * elems,
            DType::Quant(qt) => qt.bytes_for(elems),
        }
    }

    /// [`DType::bytes_for`], or `None` when the size overflows (a file's shape is untrusted).
    pub fn checked_bytes_for(self, elems: usize) -> Option<usize> {
        match self {
            DType::F32 => elems.checked_mul(4),
            DType::F16 | DType::Bf16 => elems.checked_mul(2),
            DType::Quant(qt) => (elems / qt.block_elems()).checked_mul(qt.block_bytes()),
        }
    }

    /// The alignment the in-memory element type needs.
    fn align(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Quant(_) => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Quant(qt) => qt.name(),
        }
    }

    pub fn parse(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::Bf16),
            other => QuantType::ALL
                .into_iter()
                .find(|qt| qt.name().eq_ignore_ascii_case(other))
                .map(DType::Quant),
        }
    }
}

/// Where a tensor's elements live.
enum Storage {
    /// A byte range of a memory-mapped file, aligned for the dtype.
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    F32(Vec<f32>),
    /// bf16 or f16 bits.
    Half(Vec<u16>),
    /// bf16 or f16 bits in huge pages (large generated tensors).
    HalfHuge(HugeBuffer<u16>),
    /// Quantized blocks (rows reordered at load, see `Tensor::with_rows_permuted`).
    Blocks(Vec<u8>),
}

impl Storage {
    /// A copy of `bytes` (little-endian elements of `dtype`) in memory of its own.
    fn owned(dtype: DType, bytes: &[u8]) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 | DType::Bf16 => Storage::Half(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::Quant(_) => Storage::Blocks(bytes.to_vec()),
        }
    }
}

/// One weight tensor in its stored dtype.
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor owning f32 data (used for synthetic weights and tests).
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            dtype: DType::F32,
            shape,
            storage: Storage::F32(data),
        }
    }

    /// A tensor owning bf16 or f16 bits.
    pub fn from_half_bits(dtype: DType, shape: Vec<usize>, bits: Vec<u16>) -> Tensor {
        debug_assert!(dtype != DType::F32);
        debug_assert_eq!(shape.iter().product::<usize>(), bits.len());
        Tensor {
            dtype,
            shape,
            storage: Storage::Half(bits),
        }
    }

    /// A quantized tensor owning its blocks (`shape`'s rows a multiple of the block).
    pub fn from_blocks(qt: QuantType, shape: Vec<usize>, bytes: Vec<u8>) -> Tensor {
        debug_assert_eq!(qt.bytes_for(shape.iter().product()), bytes.len());
        Tensor {
            dtype: DType::Quant(qt),
            shape,
            storage: Storage::Blocks(bytes),
        }
    }

    /// A bf16 or f16 tensor in huge pages, element `i` = `fill(i)` (see [`HugeBuffer`]).
    pub fn half_in_huge_pages(
        dtype: DType,
        shape: Vec<usize>,
        mut fill: impl FnMut(usize) -> u16,
    ) -> std::io::Result<Tensor> {
        debug_assert!(dtype != DType::F32);
        let mut bits = HugeBuffer::zeroed(shape.iter().product())?;
        for (i, b) in bits.iter_mut().enumerate() {
            *b = fill(i);
        }
        Ok(Tensor {
            dtype,
            shape,
            storage: Storage::HalfHuge(bits),
        })
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_bytes(&self) -> usize {
        self.dtype.bytes_for(self.len())
    }

    /// A tensor whose storage is `map[range]`: read in place, or copied when the file leaves
    /// it misaligned for `dtype`.
    pub(crate) fn mapped(
        map: &Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Tensor {
        let bytes = &map[range.clone()];
        let storage = if (bytes.as_ptr() as usize).is_multiple_of(dtype.align()) {
            Storage::Mapped {
                map: Arc::clone(map),
                range,
            }
        } else {
            Storage::owned(dtype, bytes)
        };
        Tensor {
            dtype,
            shape,
            storage,
        }
    }

    /// This `[rows, cols]` tensor with its rows reordered: row `i` of the result is row
    /// `from[i]` of `self` (a copy; rows are whole blocks for quantized types).
    pub(crate) fn with_rows_permuted(&self, from: &[usize]) -> Tensor {
        let rows = self.shape[0];
        assert_eq!(from.len(), rows);
        let row_bytes = self.size_bytes() / rows.max(1);
        let bytes: &[u8] = match self.data() {
            WeightData::F32(d) => bytemuck::cast_slice(d),
            WeightData::Bf16(d) | WeightData::F16(d) => bytemuck::cast_slice(d),
            WeightData::Quant(_, d) => d,
        };
        let mut out = Vec::with_capacity(bytes.len());
        for &r in from {
            out.extend_from_slice(&bytes[r * row_bytes..][..row_bytes]);
        }
        Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            storage: Storage::owned(self.dtype, &out),
        }
    }

    /// The elements in their stored dtype.
    pub fn data(&self) -> WeightData<'_> {
        match &self.storage {
            Storage::F32(v) => WeightData::F32(v),
            Storage::Half(v) => self.half(v),
            Storage::HalfHuge(v) => self.half(v),
            Storage::Blocks(v) => self.blocks(v),
            Storage::Mapped { map, range } => {
                let bytes = &map[range.clone()];
                // Alignment was checked when the tensor was opened (see `Tensor::mapped`).
                match self.dtype {
                    DType::F32 => WeightData::F32(bytemuck::cast_slice(bytes)),
                    DType::Quant(_) => self.blocks(bytes),
                    DType::F16 | DType::Bf16 => self.half(bytemuck::cast_slice(bytes)),
                }
            }
        }
    }

    fn blocks<'a>(&self, bytes: &'a [u8]) -> WeightData<'a> {
        match self.dtype {
            DType::Quant(qt) => WeightData::Quant(qt, bytes),
            _ => unreachable!("block storage holds quantized tensors only"),
        }
    }

    fn half<'a>(&self, bits: &'a [u16]) -> WeightData<'a> {
        if self.dtype == DType::Bf16 {
            WeightData::Bf16(bits)
        } else {
            WeightData::F16(bits)
        }
    }

    /// This 2-D tensor as a `[rows, cols]` matrix.
    pub fn matrix(&self) -> Matrix<'_> {
        Matrix {
            data: self.data(),
            rows: self.shape[0],
            cols: self.shape.get(1).copied().unwrap_or(1),
        }
    }

    /// All elements widened to f32 (for small vectors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let m = Matrix {
            data: self.data(),
            rows: 1,
            cols: self.len(),
        };
        let mut out = vec![0.0; self.len()];
        m.row_to_f32(0, &mut out);
        out
    }
}

struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// Why a safetensors file's tensors could not be listed.
#[derive(Debug)]
pub enum IndexError {
    Corrupt(String),
    UnsupportedDtype { tensor: String, dtype: String },
}

/// A tensor's element type, shape and byte range within its file.
pub type IndexEntry = (DType, Vec<usize>, Range<usize>);

/// The tensors a whole safetensors file (`bytes`) holds. The header is checked by the
/// `safetensors` crate: its JSON, and that the data offsets tile the rest of the file exactly,
/// each tensor's bytes matching its shape and type.
pub fn index_safetensors(
    bytes: &[u8],
) -> std::result::Result<Vec<(String, IndexEntry)>, IndexError> {
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| IndexError::Corrupt(format!("{e:?}")))?;
    let data_start = 8 + header_len;
    let mut index = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::Bf16,
            other => {
                return Err(IndexError::UnsupportedDtype {
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (begin, end) = info.data_offsets;
        let range = data_start + begin..data_start + end;
        index.push((name, (dtype, info.shape.clone(), range)));
    }
    Ok(index)
}

/// Every tensor of a model folder's safetensors file(s), by HF name.
pub struct SafetensorsStore {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Where a model's tensors come from, by their Hugging Face names.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name`, checked to have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

impl TensorSource for SafetensorsStore {
    fn contains(&self, name: &str) -> bool {
        SafetensorsStore::contains(self, name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        SafetensorsStore::tensor(self, name, shape)
    }
}

impl SafetensorsStore {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let index: ShardIndex = read_json(&index)?;
            let names: BTreeSet<String> = index.weight_map.into_values().collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(ModelError::MissingFile(
                dir.to_path_buf(),
                "model.safetensors (or model.safetensors.index.json)",
            ));
        };
        let mut store = SafetensorsStore {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in file_names {
            store.add_file(path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a model file being rewritten while served is outside
        // what any inference server can defend against (the same holds for every mmap loader).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let file_index = self.files.len();
        let index = index_safetensors(&map).map_err(|e| match e {
            IndexError::Corrupt(message) => ModelError::CorruptSafetensors {
                path: path.clone(),
                message,
            },
            IndexError::UnsupportedDtype { tensor, dtype } => ModelError::UnsupportedDtype {
                path: path.clone(),
                tensor,
                dtype,
            },
        })?;
        for (name, (dtype, shape, range)) in index {
            let entry = TensorEntry {
                file: file_index,
                dtype,
                shape,
                range,
            };
            self.tensors.insert(name, entry);
        }
        self.files.push((path, Arc::new(map)));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let (path, map) = &self.files[entry.file];
        if entry.shape != shape {
            return Err(ModelError::WrongShape {
                path: path.clone(),
                tensor: name.to_string(),
                actual: entry.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(Tensor::mapped(
            map,
            entry.range.clone(),
            entry.dtype,
            entry.shape.clone(),
        ))
    }
}
