//! `wrong-world`: a component whose world is `test:other/other`, not one of cllm's. The plugin
//! host must refuse to load it (it exports none of `rate-limit`, `priority`, `health-check`).

wit_bindgen::generate!({ path: "wit/other.wit", world: "other" });

/// Implements the foreign world.
struct Other;

impl Guest for Other {
    fn greet() -> String {
        "hello from the wrong world".to_owned()
    }
}

export!(Other);
