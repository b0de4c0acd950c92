//! Test plugin `wrong-world`: a valid WebAssembly component that implements a
//! different world (`wasmhook-test:other/greeter`, exporting only `greet`). It
//! does NOT implement `wasmhook:plugin/plugin`: the host must reject it when
//! loading (no `handle` export).

wit_bindgen::generate!({
    inline: r#"
        package wasmhook-test:other@0.1.0;

        world greeter {
            export greet: func(name: string) -> string;
        }
    "#,
    world: "greeter",
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
