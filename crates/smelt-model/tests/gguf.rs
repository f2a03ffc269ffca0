//! GGUF parsing: round trips through the writer, every metadata type, alignment, and one test per
//! malformed-input path (each must be a clean error naming the problem, never a panic).

use smelt_kernels::formats::DType;
use smelt_model::gguf::{parse, GgufError, GgufWriter, Value, ValueType};

fn sample() -> GgufWriter {
    let mut w = GgufWriter::default();
    w.kv("general.architecture", "llama".into())
        .kv("u8", Value::U8(200))
        .kv("i8", Value::I8(-5))
        .kv("u16", Value::U16(60000))
        .kv("i16", Value::I16(-30000))
        .kv("u32", Value::U32(4_000_000_000))
        .kv("i32", Value::I32(-2_000_000_000))
        .kv("f32", Value::F32(1.5))
        .kv("bool", Value::Bool(true))
        .kv("string", "héllo".into())
        .kv("u64", Value::U64(1 << 40))
        .kv("i64", Value::I64(-(1 << 40)))
        .kv("f64", Value::F64(-2.25))
        .kv("strings", Value::strings(&["a", "", "ü"]))
        .kv("nested", Value::Array(ValueType::Array, vec![Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(2)])]));
    w.tensor("a", &[32, 2], DType::F32, vec![1; 256]);
    w.tensor("b", &[64], DType::Q8_0, vec![2; 68]);
    w
}

#[test]
fn round_trip_every_value_type() {
    let w = sample();
    let h = parse(&w.to_bytes()).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata, w.metadata);
    assert_eq!(h.get_u64("u32").unwrap(), Some(4_000_000_000));
    assert_eq!(h.get_u64("i8").unwrap_err().to_string(), "metadata key \"i8\": expected a non-negative integer, found i8 -5");
    assert_eq!(h.get_str("string").unwrap(), Some("héllo"));
    let a = h.tensor("a").unwrap();
    assert_eq!((a.dims.clone(), a.dtype, a.n_bytes), (vec![32, 2], DType::F32, 256));
    assert_eq!(a.offset % 32, 0);
    let b = h.tensor("b").unwrap();
    assert_eq!(b.offset, a.offset + 256);
    assert_eq!(h.data_offset, a.offset);
}

#[test]
fn general_alignment_is_honoured() {
    let mut w = sample();
    w.kv("general.alignment", Value::U32(64));
    // The writer lays data out at 32-byte alignment; tensor offsets 0 and 256 are multiples of 64
    // too, so only the start of the data section moves (up to the next multiple of 64).
    let mut bytes = w.to_bytes();
    bytes.resize(bytes.len() + 64, 0);
    let h = parse(&bytes).unwrap();
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    assert_eq!(h.tensors[0].offset, h.data_offset);

    let mut bad = sample();
    bad.kv("general.alignment", Value::U32(48));
    let e = parse(&bad.to_bytes()).unwrap_err().to_string();
    assert!(e.contains("general.alignment") && e.contains("power of two"), "{e}");
}

fn err(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "one-line errors: {s}");
            s
        }
    }
}

#[test]
fn bad_magic_version_and_endianness() {
    let good = sample().to_bytes();
    let mut b = good.clone();
    b[0..4].copy_from_slice(b"GGML");
    assert!(err(&b).contains("not a GGUF file"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(err(&b).contains("unsupported GGUF version 1"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err(&b).contains("big-endian"));
    assert!(err(b"GG").contains("truncated"));
    assert!(err(b"").contains("truncated"));
}

#[test]
fn truncation_anywhere_is_an_error() {
    let good = sample().to_bytes();
    let h = parse(&good).unwrap();
    let end = h.tensors.iter().map(|t| t.offset + t.n_bytes).max().unwrap() as usize;
    for len in 0..end {
        let r = parse(&good[..len]);
        assert!(r.is_err(), "prefix of {len} bytes parsed");
    }
}

#[test]
fn absurd_counts_are_rejected_without_allocating() {
    let good = sample().to_bytes();
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(&b).contains("tensor count"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err(&b).contains("metadata count"));
    // A string length far beyond the file.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(err(&b).contains("truncated"));
}

fn single_kv(key: &str, type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(payload);
    b
}

#[test]
fn bad_values() {
    let e = err(&single_kv("k", 13, &[0; 8]));
    assert!(e.contains("unknown value type 13") && e.contains("\"k\""), "{e}");
    let e = err(&single_kv("flag", 7, &[2]));
    assert!(e.contains("bool") && e.contains("flag"), "{e}");
    let mut p = 2u64.to_le_bytes().to_vec();
    p.extend([0xff, 0xfe]);
    let e = err(&single_kv("name", 8, &p));
    assert!(e.contains("UTF-8") && e.contains("name"), "{e}");
    let mut p = 99u32.to_le_bytes().to_vec();
    p.extend(1u64.to_le_bytes());
    let e = err(&single_kv("arr", 9, &p));
    assert!(e.contains("unknown element type 99"), "{e}");
    let mut p = 4u32.to_le_bytes().to_vec();
    p.extend((1u64 << 62).to_le_bytes());
    let e = err(&single_kv("arr", 9, &p));
    assert!(e.contains("truncated") && e.contains("arr"), "{e}");
    // Arrays nested beyond the limit.
    let mut p = Vec::new();
    for _ in 0..10 {
        p.extend(9u32.to_le_bytes());
        p.extend(1u64.to_le_bytes());
    }
    let e = err(&single_kv("deep", 9, &p));
    assert!(e.contains("nest"), "{e}");
    let mut w = sample();
    w.kv("u8", Value::U8(1));
    assert!(err(&w.to_bytes()).contains("duplicate key \"u8\""));
}

#[test]
fn bad_tensors() {
    let mut w = GgufWriter::default();
    w.tensor("x", &[33], DType::Q8_0, vec![0; 34]);
    let e = err(&w.to_bytes());
    assert!(e.contains("\"x\"") && e.contains("multiple of the Q8_0 block size"), "{e}");

    let mut w = GgufWriter::default();
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    let mut b = w.to_bytes();
    // type id sits after name (8+1), n_dims (4), dims (8): at 24 + 21.
    b[24 + 21..24 + 25].copy_from_slice(&16u32.to_le_bytes());
    let e = err(&b);
    assert!(e.contains("\"t\"") && e.contains("IQ2_XXS"), "{e}");
    b[24 + 21..24 + 25].copy_from_slice(&1000u32.to_le_bytes());
    assert!(err(&b).contains("unknown type id 1000"));

    let mut w = GgufWriter::default();
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    let mut b = w.to_bytes();
    b[24 + 9..24 + 13].copy_from_slice(&7u32.to_le_bytes());
    assert!(err(&b).contains("7 dimensions"));

    // Data beyond the end of the file.
    let mut w = GgufWriter::default();
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    let b = w.to_bytes();
    let end = parse(&b).unwrap().tensors[0].offset as usize + 16;
    let e = err(&b[..end - 1]);
    assert!(e.contains("\"t\"") && e.contains("beyond the end"), "{e}");

    // Misaligned offset and overflowing dimensions.
    let mut w = GgufWriter::default();
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    let mut b = w.to_bytes();
    b[24 + 25..24 + 33].copy_from_slice(&3u64.to_le_bytes());
    assert!(err(&b).contains("not a multiple of the alignment"));
    let mut w = GgufWriter::default();
    w.tensor("t", &[1 << 40, 1 << 40], DType::F32, vec![0; 16]);
    assert!(err(&w.to_bytes()).contains("overflow"));

    let mut w = GgufWriter::default();
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    w.tensor("t", &[4], DType::F32, vec![0; 16]);
    assert!(err(&w.to_bytes()).contains("duplicate tensor name"));

    let long = "n".repeat(65);
    let mut w = GgufWriter::default();
    w.tensor(&long, &[4], DType::F32, vec![0; 16]);
    assert!(err(&w.to_bytes()).contains("65 bytes"));
}

#[test]
fn random_corruption_never_panics() {
    let good = sample().to_bytes();
    let mut state = 0x9E3779B97F4A7C15u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = good.clone();
        let flips = 1 + (state % 4) as usize;
        for k in 0..flips {
            let pos = ((state >> (8 * k)) as usize) % b.len();
            b[pos] ^= 1 << ((state >> 40) % 8);
        }
        let _ = parse(&b);
    }
}

#[test]
fn open_reports_missing_files_with_the_path() {
    let e = smelt_model::gguf::GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).err().unwrap();
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}
