"""IST: the nodes of one part share its Mask and the server cuts its slice once (one
ArrayRecord for all of them); every node still gets exactly its part's slice, and a round
with shared slices equals one where every node's slice is cut on its own."""

import torch
from flwr.app import ArrayRecord

from fl_subnet.core.masks import Mask
from fl_subnet.core.samplers import PartitionSampler
from fl_subnet.strategies import IST, FederatedDropout
from fl_subnet.wire import arrays_to_state

from strategy_helpers import factory, grid, initial_arrays, train_config


def test_the_slots_of_a_part_share_one_mask():
    groups = IST(factory, 3).groups
    masks = PartitionSampler(3, seed=5).sample(groups, 2, 8)
    assert [next(j for j in range(3) if masks[j] is m) for m in masks] == [0, 1, 2, 0, 1, 2, 0, 1]  # part i mod 3
    assert len({id(m) for m in masks}) == 3
    for g in groups:  # still a partition of every group
        kept = torch.cat([masks[i].indices[g.name] for i in range(3)]).sort().values
        assert torch.equal(kept, torch.arange(g.size))


def test_nodes_of_one_part_get_one_slice_and_each_the_right_one():
    strategy = IST(factory, 2, num_train_nodes=6, fraction_evaluate=0.0)
    arrays = initial_arrays()
    msgs = list(strategy.configure_train(1, arrays, train_config(), grid(6)))
    records = [m.content["arrays"] for m in msgs]
    assert len({id(r) for r in records}) == 2  # one ArrayRecord per part
    full = arrays_to_state(arrays)
    for m, record in zip(msgs, records):
        mask = strategy._sent[m.metadata.dst_node_id]
        got = strategy.slice_state(record, m.metadata.dst_node_id)
        want = strategy.slicer.gather(full, mask)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_federated_dropout_masks_are_cut_per_node():
    strategy = FederatedDropout(factory, 0.5, num_train_nodes=4, fraction_evaluate=0.0)
    msgs = list(strategy.configure_train(1, initial_arrays(), train_config(), grid(4)))
    assert len({id(m.content["arrays"]) for m in msgs}) == 4


def test_a_round_with_shared_slices_equals_one_with_a_slice_per_node(monkeypatch):
    """The same IST rounds with the sampler's masks copied per slot (no sharing): the same
    global model, bit for bit, through Flower's serde both ways (in-process grid)."""
    def run():
        strategy = IST(factory, 2, num_train_nodes=4, fraction_evaluate=0.0, local_steps=3)
        result = strategy.start(grid=grid(4), initial_arrays=initial_arrays(), num_rounds=2,
                                train_config=train_config())
        return arrays_to_state(result.arrays)

    shared = run()
    sample = PartitionSampler.sample

    def one_mask_per_slot(self, groups, server_round, num_masks):
        return [Mask({k: v.clone() for k, v in m.indices.items()}, dict(m.scale))
                for m in sample(self, groups, server_round, num_masks)]

    monkeypatch.setattr(PartitionSampler, "sample", one_mask_per_slot)
    apart = run()
    assert shared.keys() == apart.keys() and all(torch.equal(shared[k], apart[k]) for k in shared)
    assert isinstance(initial_arrays(), ArrayRecord)


def test_nodes_of_one_capacity_share_a_mask_and_a_slice():
    from fl_subnet.core.samplers import NestedPrefixSampler, RollingWindowSampler
    from fl_subnet.strategies import HeteroFL

    groups = IST(factory, 2).groups
    for sampler in (NestedPrefixSampler(scale=True), RollingWindowSampler()):
        masks = sampler.sample(groups, 3, 5, capacities=[0.5, 1.0, 0.5, None, 0.25])
        assert masks[0] is masks[2] and masks[1] is masks[3] and len({id(m) for m in masks}) == 3
        want = sampler.sample(groups, 3, 1, capacities=[0.25])[0]
        assert all(torch.equal(masks[4].indices[g.name], want.indices[g.name]) for g in groups)
    strategy = HeteroFL(factory, capacity_tiers=[0.5, 1.0], num_train_nodes=4, fraction_evaluate=0.0)
    msgs = list(strategy.configure_train(1, initial_arrays(), train_config(), grid(4)))
    assert len({id(m.content["arrays"]) for m in msgs}) == 2  # the full model's record, one half-width slice
