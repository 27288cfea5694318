//! Neural-network building blocks (candle-nn style): augmentation today.
