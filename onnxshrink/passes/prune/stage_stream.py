"""Streaming the inputs of the refit stages over the calibration samples, computing every node
once overall (instead of one forward pass per stage)."""

from __future__ import annotations

__all__ = ["StageStream"]

import numpy as np
import onnx


class StageStream:
    """Inputs of each refit stage on every sample, computing every node once overall.

    Stage k's layers must see inputs produced by the already refit stages < k, so the sample
    activations are streamed stage by stage: a tensor's level is the highest stage of the refit
    layers upstream of it (-1: none); pass k runs, from the frontier F(k-1) kept in memory, only
    the nodes needed for stage k's inputs and for F(k) = the tensors of level < k that a later
    node still reads. onnxruntime computes every node of a model whatever is fetched, so this is
    what keeps the cost at about one forward pass instead of one per stage."""

    def __init__(self, model: onnx.ModelProto, stages: list, samples: list):
        g = model.graph
        self.model = model
        self.stages = stages
        self.samples = samples
        self.nodes_run = 0
        self.inits = {t.name for t in g.initializer}
        self.prod = {}
        for i, n in enumerate(g.node):
            for o in n.output:
                self.prod[o] = i
        stage_of = {nm: k for k, st in enumerate(stages) for nm in st}
        self.lvl = {t.name: -1 for t in g.input}
        node_lvl = []
        for n in g.node:
            lv = max([self.lvl.get(t, -1) for t in n.input if t], default=-1)
            lv = max(lv, stage_of.get(n.name, -1))
            node_lvl.append(lv)
            for o in n.output:
                self.lvl[o] = lv
        # nodes some stage input depends on
        by_name = {n.name: n for n in g.node}
        need = set()
        todo = [by_name[nm].input[0] for st in stages for nm in st]
        while todo:
            t = todo.pop()
            i = self.prod.get(t)
            if i is None or i in need:
                continue
            need.add(i)
            todo.extend(x for x in g.node[i].input if x and x not in self.inits)
        self.need = need
        # last stage at which each activation is read by a needed node of a later level
        self.read_until = {}
        for i in need:
            for t in g.node[i].input:
                if t and t not in self.inits:
                    self.read_until[t] = max(self.read_until.get(t, -1), node_lvl[i])
        for st in stages:
            for nm in st:
                t = by_name[nm].input[0]
                self.read_until[t] = max(self.read_until.get(t, -1), stage_of[nm])
        self.stage_inputs = [[by_name[nm].input[0] for nm in st] for st in stages]
        self.types = {}
        try:
            inf = onnx.shape_inference.infer_shapes(model)
            for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        except Exception:
            pass
        self.frontier = [dict(s) for s in samples]

    def inputs_of_stage(self, k: int, model: onnx.ModelProto | None):
        """Yield, per sample, {input tensor of a stage-k layer: value}; ``model`` is the current
        (partly refit) model (None: unchanged since the stream was built)."""
        from onnxshrink.runtime import make_session
        have = set(self.frontier[0])
        # frontier after this pass: tensors of level < k still read at level >= k
        keep = {t for t, last in self.read_until.items() if self.lvl.get(t, 99) < k and last >= k}
        want = list(dict.fromkeys(self.stage_inputs[k] + sorted(keep - have)))
        fetch = [t for t in want if t not in have]
        sess = None
        if fetch:
            if model is not None:
                self.model = model
            sub, feeds = self._submodel(self.model, fetch, have)
            sess = make_session(sub, optimize=False)
        for si in range(len(self.samples)):
            cur = self.frontier[si]
            if sess is not None:
                out = sess.run(fetch, {t: cur[t] for t in feeds})
                cur.update(zip(fetch, out))
            yield {t: cur[t] for t in self.stage_inputs[k]}
            for t in list(cur):
                if t not in keep:
                    del cur[t]

    def _submodel(self, model: onnx.ModelProto, outputs: list, have: set):
        g = model.graph
        prod = {o: i for i, n in enumerate(g.node) for o in n.output}
        nodes, feeds = set(), set()
        todo = list(outputs)
        while todo:
            t = todo.pop()
            if t in have:
                feeds.add(t)
                continue
            i = prod.get(t)
            if i is None or i in nodes:
                continue
            nodes.add(i)
            todo.extend(x for x in g.node[i].input if x)
        self.nodes_run += len(nodes)
        used = {x for i in nodes for x in g.node[i].input}
        sample = self.frontier[0]

        def vi(name, arr=None):
            et = self.types.get(name) or (onnx.helper.np_dtype_to_tensor_dtype(arr.dtype) if arr is not None
                                          else onnx.TensorProto.FLOAT)
            return onnx.helper.make_tensor_value_info(name, et, None)

        sg = onnx.helper.make_graph([g.node[i] for i in sorted(nodes)], "refit_stage",
                                    [vi(t, np.asarray(sample[t])) for t in sorted(feeds)],
                                    [vi(t) for t in outputs],
                                    initializer=[t for t in g.initializer if t.name in used])
        m = onnx.helper.make_model(sg, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        return m, sorted(feeds)
