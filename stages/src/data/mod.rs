//! Data readers and the dataset artifact format.
