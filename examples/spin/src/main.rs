//! `spin`: never returns. The node must stop it at the CPU budget / deadline.

fn main() {
    println!("Content-Type: text/plain");
    println!();
    let mut counter: u64 = 0;
    loop {
        // `black_box` keeps the optimizer from removing the loop.
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}
