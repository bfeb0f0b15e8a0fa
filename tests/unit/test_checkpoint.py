"""The host copy a background checkpoint writes from: independent of the training that goes on."""

import torch

from moe_train.train.checkpoint import _host_copy


def test_host_copy_keeps_the_values_of_the_moment_it_was_taken():
    weight, moment = torch.randn(4, 3), torch.randn(3)
    state = {"model": {"w": weight, "view": weight[1:]}, "optim": {"state": [moment], "lr": 0.1}, "step": 7}
    copy = _host_copy(state)
    expected = {"w": weight.clone(), "moment": moment.clone()}
    weight.add_(1.0)  # the training's next updates, in place
    moment.mul_(0.0)
    assert torch.equal(copy["model"]["w"], expected["w"])
    assert torch.equal(copy["model"]["view"], expected["w"][1:])
    assert torch.equal(copy["optim"]["state"][0], expected["moment"])
    assert copy["optim"]["lr"] == 0.1 and copy["step"] == 7
