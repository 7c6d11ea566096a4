//! What a component's bytes tell before it is compiled: that it is a
//! component at all, what it imports, and which grants it declares.
//!
//! Compiling a large module takes seconds (tens of seconds for a 12 MB
//! JavaScript component); a module that imports WASI, or is a core module,
//! or declares a grant nobody knows, is refused here in milliseconds, before
//! any of that work. The engine still checks the compiled component's type
//! afterwards: this is a fast first look, not the only one.
//!
//! **Declared grants.** A policy says what it needs in a custom section of
//! the component, [`GRANTS_SECTION`], holding a JSON array of grant names
//! (`["set_status", "record_event"]`). `heartgate policy build` writes it
//! from the crate's `[package.metadata.heartgate] grants`. A chain refuses a
//! slot whose grants do not cover what its module declares, so a missing
//! grant is found when the chain is staged, not as `ungranted_action` on
//! every request in production.

use wasmparser::{ComponentTypeRef, Encoding, Parser, Payload, TypeBounds};

use super::LoadError;
use crate::chain::Grant;

/// The custom section in which a component declares the grants it needs.
pub const GRANTS_SECTION: &str = "heartgate:grants";

/// The most bytes a grants section may have (seven names fit in 120).
const MAX_GRANTS_SECTION_BYTES: usize = 1024;

/// What the bytes of a component say before it is compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Precheck {
    /// The component's own imports (not those of the components and modules
    /// nested inside it, which it satisfies itself, nor the types it
    /// imports by equality, which ask for nothing).
    pub imports: Vec<String>,
    /// The grants it declares, when it has a [`GRANTS_SECTION`].
    pub declared_grants: Option<Vec<Grant>>,
}

/// Read `bytes` as a component, without compiling it.
pub fn precheck(bytes: &[u8]) -> Result<Precheck, LoadError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::Compile(format!(
            "not WebAssembly: a component starts with the bytes `\\0asm`, {}",
            match bytes.len() {
                0 => "this file is empty".to_string(),
                n if bytes[..n.min(64)]
                    .iter()
                    .all(|b| b.is_ascii_graphic() || *b == b' ' || b.is_ascii_whitespace()) =>
                {
                    "this file starts with text".to_string()
                }
                n => format!("this file ({n} bytes) does not"),
            }
        )));
    }
    let mut out = Precheck::default();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError::Compile(format!("{e}")))?;
        match payload {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err(LoadError::Compile(
                        "this is a core WebAssembly module, not a component; \
                         `heartgate policy build` turns a policy crate into a component"
                            .into(),
                    ));
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(|e| LoadError::Compile(format!("{e}")))?;
                    // A type imported by equality (how a world's `use`d
                    // types are named) asks the host for nothing.
                    if matches!(import.ty, ComponentTypeRef::Type(TypeBounds::Eq(_))) {
                        continue;
                    }
                    out.imports.push(import.name.full_name().into_owned());
                }
            }
            Payload::CustomSection(section) if depth == 1 && section.name() == GRANTS_SECTION => {
                if out.declared_grants.is_some() {
                    return Err(LoadError::BadMetadata(format!(
                        "the component has two `{GRANTS_SECTION}` sections"
                    )));
                }
                out.declared_grants = Some(parse_grants(section.data())?);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn parse_grants(data: &[u8]) -> Result<Vec<Grant>, LoadError> {
    let bad = |why: String| {
        LoadError::BadMetadata(format!(
            "its `{GRANTS_SECTION}` section {why}; it must be a JSON array of grant names ({})",
            Grant::ALL.map(Grant::as_str).join(", ")
        ))
    };
    if data.len() > MAX_GRANTS_SECTION_BYTES {
        return Err(bad(format!("has {} bytes", data.len())));
    }
    let names: Vec<String> =
        serde_json::from_slice(data).map_err(|e| bad(format!("is not a list of names ({e})")))?;
    let mut grants = Vec::with_capacity(names.len());
    for name in &names {
        let grant = Grant::parse(name).ok_or_else(|| bad(format!("names `{name}`")))?;
        if !grants.contains(&grant) {
            grants.push(grant);
        }
    }
    Ok(grants)
}

/// `component` with a [`GRANTS_SECTION`] declaring `grants` appended (what
/// `heartgate policy build` writes). A component's custom sections may
/// come anywhere at its top level.
pub fn with_declared_grants(component: &[u8], grants: &[Grant]) -> Vec<u8> {
    let names: Vec<&str> = grants.iter().map(|g| g.as_str()).collect();
    let data = serde_json::to_vec(&names).unwrap_or_else(|_| b"[]".to_vec());
    let mut payload = Vec::with_capacity(data.len() + GRANTS_SECTION.len() + 5);
    leb128(&mut payload, GRANTS_SECTION.len());
    payload.extend_from_slice(GRANTS_SECTION.as_bytes());
    payload.extend_from_slice(&data);
    let mut out = Vec::with_capacity(component.len() + payload.len() + 6);
    out.extend_from_slice(component);
    out.push(0); // custom section
    leb128(&mut out, payload.len());
    out.extend_from_slice(&payload);
    out
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component: the preamble alone.
    const EMPTY_COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    const EMPTY_MODULE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

    #[test]
    fn declared_grants_round_trip() {
        let bytes = with_declared_grants(&EMPTY_COMPONENT, &[Grant::SetStatus, Grant::RecordEvent]);
        let seen = precheck(&bytes).map_err(|e| e.to_string());
        assert_eq!(
            seen,
            Ok(Precheck {
                imports: Vec::new(),
                declared_grants: Some(vec![Grant::SetStatus, Grant::RecordEvent]),
            })
        );
        let none = precheck(&EMPTY_COMPONENT).map_err(|e| e.to_string());
        assert_eq!(none, Ok(Precheck::default()));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let core = precheck(&EMPTY_MODULE).map_err(|e| e.to_string());
        assert!(
            core.as_ref()
                .is_err_and(|e| e.contains("core WebAssembly module")),
            "{core:?}"
        );
        let text = precheck(b"root:x:0:0:root:/root:/bin/bash\n").map_err(|e| e.to_string());
        assert!(text.is_err(), "{text:?}");
        assert!(!format!("{text:?}").contains("[114, 111"), "{text:?}");

        let mut unknown = EMPTY_COMPONENT.to_vec();
        let data = br#"["set_status","teleport"]"#;
        let mut payload = vec![GRANTS_SECTION.len() as u8];
        payload.extend_from_slice(GRANTS_SECTION.as_bytes());
        payload.extend_from_slice(data);
        unknown.push(0);
        unknown.push(payload.len() as u8);
        unknown.extend_from_slice(&payload);
        let seen = precheck(&unknown).map_err(|e| e.to_string());
        assert!(
            seen.as_ref().is_err_and(|e| e.contains("names `teleport`")),
            "{seen:?}"
        );

        let twice = with_declared_grants(
            &with_declared_grants(&EMPTY_COMPONENT, &[Grant::Drop]),
            &[Grant::Drop],
        );
        let seen = precheck(&twice).map_err(|e| e.to_string());
        assert!(seen.as_ref().is_err_and(|e| e.contains("two")), "{seen:?}");
    }

    #[test]
    fn leb128_encodes_multi_byte_lengths() {
        let mut out = Vec::new();
        leb128(&mut out, 624_485);
        assert_eq!(out, [0xe5, 0x8e, 0x26]);
    }
}
