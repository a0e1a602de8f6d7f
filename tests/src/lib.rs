pub mod api_bench;
pub mod bench;
pub mod harness;
pub mod netns;
pub mod packet;
