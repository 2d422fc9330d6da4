//! `grow`: allocates memory without bound. The node's memory limit must stop it.

fn main() {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch the memory so the allocation is real.
        let chunk = vec![1u8; 1 << 20];
        chunks.push(std::hint::black_box(chunk));
    }
}
