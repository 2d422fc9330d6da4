//! `hello`: the smallest useful WAGI function.
//!
//! Reads the CGI environment the node sets, answers `hello, <name>` where
//! `<name>` is the `name=` parameter of the query string (or `world`), and
//! says which request method it was called with.

use std::env;

fn main() {
    let query = env::var("QUERY_STRING").unwrap_or_default();
    let name = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "name")
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| "world".to_owned());
    let method = env::var("REQUEST_METHOD").unwrap_or_else(|_| "GET".to_owned());

    // A CGI response: header lines, a blank line, then the body.
    println!("Content-Type: text/plain");
    println!();
    println!("hello, {name}");
    println!("method: {method}");
}
