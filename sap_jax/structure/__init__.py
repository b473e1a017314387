"""The channel-group language every other layer speaks: groups and slices (:mod:`.groups`),
module state as arrays (:mod:`.codec`), MACs and parameters (:mod:`.flops`), per-channel norms
(:mod:`.norms`) and slicing any module down to kept channels (:mod:`.slicing`)."""
