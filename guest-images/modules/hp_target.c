// SPDX-License-Identifier: GPL-2.0
/*
 * hyperpatch test module: functions for hyperpatch's own tests to patch.
 *
 *   /proc/hp_target  prints hp_target_message()
 *   /proc/hp_sleep   a read sleeps inside hp_sleep_wait() until /proc/hp_wake
 *                    is written, then prints "woke <hp_target_message()>"
 *   /proc/hp_bench   write N: calls hp_bench_target() N times, timing it with
 *                    the TSC (and an empty loop as the baseline); read:
 *                    "N cycles_target cycles_baseline"
 *   /proc/hp_many    prints the sum of hp_f01()..hp_f20()
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/sched.h>
#include <linux/timex.h>

static DECLARE_WAIT_QUEUE_HEAD(hp_wq);
static int hp_woken;

noinline const char *hp_target_message(void)
{
	return "original";
}

noinline int hp_sleep_wait(void)
{
	int ret = wait_event_interruptible(hp_wq, hp_woken);

	hp_woken = 0;
	return ret;
}

noinline int hp_bench_target(int x)
{
	barrier();
	return x + 1;
}

#define HP_F(n) noinline int hp_f##n(void) { barrier(); return 1; }
HP_F(01) HP_F(02) HP_F(03) HP_F(04) HP_F(05) HP_F(06) HP_F(07) HP_F(08) HP_F(09) HP_F(10)
HP_F(11) HP_F(12) HP_F(13) HP_F(14) HP_F(15) HP_F(16) HP_F(17) HP_F(18) HP_F(19) HP_F(20)

static int hp_target_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", hp_target_message());
	return 0;
}

static int hp_sleep_show(struct seq_file *m, void *v)
{
	int ret = hp_sleep_wait();

	seq_printf(m, "woke %d %s\n", ret, hp_target_message());
	return 0;
}

static ssize_t hp_wake_write(struct file *f, const char __user *buf, size_t n, loff_t *off)
{
	hp_woken = 1;
	wake_up_interruptible(&hp_wq);
	return n;
}

static unsigned long hp_bench_n;
static u64 hp_bench_target_cycles, hp_bench_base_cycles;

static ssize_t hp_bench_write(struct file *f, const char __user *buf, size_t n, loff_t *off)
{
	unsigned long count, i;
	cycles_t t0, t1, t2;
	int acc = 0;

	if (kstrtoul_from_user(buf, n, 10, &count))
		return -EINVAL;
	t0 = get_cycles();
	for (i = 0; i < count; i++) {
		acc += 1;
		barrier();
	}
	t1 = get_cycles();
	for (i = 0; i < count; i++)
		acc = hp_bench_target(acc);
	t2 = get_cycles();
	hp_bench_n = count;
	hp_bench_base_cycles = t1 - t0;
	hp_bench_target_cycles = t2 - t1;
	return acc ? n : n;
}

static int hp_bench_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%lu %llu %llu\n", hp_bench_n, hp_bench_target_cycles, hp_bench_base_cycles);
	return 0;
}

static int hp_many_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%d\n", hp_f01() + hp_f02() + hp_f03() + hp_f04() + hp_f05() + hp_f06() + hp_f07() +
		   hp_f08() + hp_f09() + hp_f10() + hp_f11() + hp_f12() + hp_f13() + hp_f14() + hp_f15() +
		   hp_f16() + hp_f17() + hp_f18() + hp_f19() + hp_f20());
	return 0;
}

static int hp_open_target(struct inode *i, struct file *f) { return single_open(f, hp_target_show, NULL); }
static int hp_open_sleep(struct inode *i, struct file *f) { return single_open(f, hp_sleep_show, NULL); }
static int hp_open_bench(struct inode *i, struct file *f) { return single_open(f, hp_bench_show, NULL); }
static int hp_open_many(struct inode *i, struct file *f) { return single_open(f, hp_many_show, NULL); }

static const struct proc_ops hp_target_ops = { .proc_open = hp_open_target, .proc_read = seq_read, .proc_release = single_release };
static const struct proc_ops hp_sleep_ops = { .proc_open = hp_open_sleep, .proc_read = seq_read, .proc_release = single_release };
static const struct proc_ops hp_wake_ops = { .proc_write = hp_wake_write };
static const struct proc_ops hp_bench_ops = { .proc_open = hp_open_bench, .proc_read = seq_read, .proc_write = hp_bench_write, .proc_release = single_release };
static const struct proc_ops hp_many_ops = { .proc_open = hp_open_many, .proc_read = seq_read, .proc_release = single_release };

static int __init hp_target_init(void)
{
	proc_create("hp_target", 0444, NULL, &hp_target_ops);
	proc_create("hp_sleep", 0444, NULL, &hp_sleep_ops);
	proc_create("hp_wake", 0222, NULL, &hp_wake_ops);
	proc_create("hp_bench", 0666, NULL, &hp_bench_ops);
	proc_create("hp_many", 0444, NULL, &hp_many_ops);
	return 0;
}

static void __exit hp_target_exit(void)
{
	remove_proc_entry("hp_target", NULL);
	remove_proc_entry("hp_sleep", NULL);
	remove_proc_entry("hp_wake", NULL);
	remove_proc_entry("hp_bench", NULL);
	remove_proc_entry("hp_many", NULL);
}

module_init(hp_target_init);
module_exit(hp_target_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hyperpatch test targets");
