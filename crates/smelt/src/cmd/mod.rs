pub mod bench;
pub mod generate;
pub mod run;
pub mod store;
pub mod tokenize;
