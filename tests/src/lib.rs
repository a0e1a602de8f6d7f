pub mod bench;
pub mod harness;
pub mod netns;
pub mod packet;
pub mod api_bench;
