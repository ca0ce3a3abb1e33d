// Checks a cluster test's history with porcupine (a linearizability
// checker): every append the cluster acknowledged, each with the
// partition and offset it was given, and every read of a whole partition
// from some node, with the times each was called and answered.
//
// The model is the log, one partition at a time: an append of a value at
// offset o is legal when the partition holds exactly o records (so offsets
// follow the real-time order of acknowledgements and none is handed out
// twice); a read is legal when what it returned is a prefix of the
// partition at some point while it ran (any node may lag, but none may
// return a record before it was written, in another order, or with a
// gap). Appends whose answer was lost are given by the test as found in
// the final log, answered at the end of the history.
//
//	go run . HISTORY.json   # exit 0: linearizable; 1: not (a visualization is written beside it)
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/anishathalye/porcupine"
)

type op struct {
	Client    int      `json:"client"`
	Kind      string   `json:"kind"`
	Partition int      `json:"partition"`
	Value     string   `json:"value"`
	Offset    int      `json:"offset"`
	Values    []string `json:"values"`
	Call      int64    `json:"call"`
	Return    int64    `json:"return"`
}

type input struct {
	kind      string
	partition int
	value     string
	values    []string
}

var model = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		by := map[int][]porcupine.Operation{}
		for _, o := range history {
			p := o.Input.(input).partition
			by[p] = append(by[p], o)
		}
		out := [][]porcupine.Operation{}
		for _, ops := range by {
			out = append(out, ops)
		}
		return out
	},
	Init: func() interface{} { return []string{} },
	Step: func(state, in, out interface{}) (bool, interface{}) {
		log := state.([]string)
		i := in.(input)
		switch i.kind {
		case "append":
			if out.(int) != len(log) {
				return false, state
			}
			next := make([]string, len(log)+1)
			copy(next, log)
			next[len(log)] = i.value
			return true, next
		default:
			if len(i.values) > len(log) {
				return false, state
			}
			for k, v := range i.values {
				if log[k] != v {
					return false, state
				}
			}
			return true, state
		}
	},
	Equal: func(a, b interface{}) bool {
		x, y := a.([]string), b.([]string)
		if len(x) != len(y) {
			return false
		}
		for k := range x {
			if x[k] != y[k] {
				return false
			}
		}
		return true
	},
	DescribeOperation: func(in, out interface{}) string {
		i := in.(input)
		if i.kind == "append" {
			return fmt.Sprintf("append(p%d, %s) -> %v", i.partition, i.value, out)
		}
		return fmt.Sprintf("read(p%d) -> %d records", i.partition, len(i.values))
	},
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: porcupine HISTORY.json")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var ops []op
	if err := json.Unmarshal(raw, &ops); err != nil {
		fmt.Fprintln(os.Stderr, "history:", err)
		os.Exit(2)
	}
	history := make([]porcupine.Operation, 0, len(ops))
	appends, reads := 0, 0
	for _, o := range ops {
		in := input{kind: o.Kind, partition: o.Partition, value: o.Value, values: o.Values}
		var out interface{} = 0
		if o.Kind == "append" {
			out = o.Offset
			appends++
		} else {
			reads++
		}
		history = append(history, porcupine.Operation{
			ClientId: o.Client, Input: in, Call: o.Call, Output: out, Return: o.Return,
		})
	}
	result, info := porcupine.CheckOperationsVerbose(model, history, 0)
	fmt.Printf("%d appends, %d reads: %v\n", appends, reads, result)
	if result != porcupine.Ok {
		file := os.Args[1] + ".html"
		if f, err := os.Create(file); err == nil {
			_ = porcupine.Visualize(model, info, f)
			f.Close()
			fmt.Println("visualization:", file)
		}
		os.Exit(1)
	}
}
