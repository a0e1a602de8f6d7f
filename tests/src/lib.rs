pub mod api_bench;
pub mod bench;
pub mod etcd;
pub mod fleet_bench;
pub mod fuzz;
pub mod harness;
pub mod netns;
pub mod packet;
