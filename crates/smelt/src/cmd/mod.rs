pub mod bench;
pub mod generate;
pub mod merge;
pub mod run;
pub mod serve;
pub mod store;
pub mod tokenize;
pub mod tune;
