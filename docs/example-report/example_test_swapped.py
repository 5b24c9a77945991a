
from tinymodels import TwoLinear, linear_input


class TwoLinearSwapped(TwoLinear):
    pass

def test_swapped_map_entry(trt_refit):
    engine = trt_refit.engine_for(TwoLinearSwapped, linear_input())
    wm = engine.weight_map.sources
    a, b = "fc1/linear.weight CONSTANT", "fc2/linear.weight CONSTANT"
    wm[a], wm[b] = wm[b], wm[a]     # the deliberate fault
    trt_refit.check(TwoLinearSwapped, TwoLinearSwapped().state_dict(), linear_input())
